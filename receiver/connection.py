"""websockets' server connection, with the platform's text frames split off the hot path.

``StreamConnection`` is websockets' ``ServerConnection`` (handshake, auth hooks, keepalive,
close handshake, errors) until its handler calls ``take_over()``. From then on its bytes go
through ``receiver.frames.TextFrames``, and ``consume()`` hands every text message a read
brought to the handler's consumer straight from ``data_received``: no task wake-up a read,
which is most of a frame's cost when the platform sends one frame a read (20 ms apart). Pings,
pongs and whatever the splitter hands back still go to websockets, which carries on as if it
had parsed every frame itself. Measured by ``bench.run``, see ``bench/README.md``.

Once the consumer has ended the stream, the bytes that follow (the client's close frame,
typically in the same read as its ``stop``) wait until the handler calls ``release()`` after
finishing the files: websockets would answer the close, and the client see the connection
end, before the last batch was written. The same holds for what websockets sends by itself
while the stream is live (its answer to a client's close; its own close for a frame too big,
invalid UTF-8, bad framing, a keepalive timeout): ``send_data`` keeps it, ``consume`` raises
``ConnectionClosed`` as if the connection had ended, and ``release()`` sends it.

A read is handed on in slices of ``_SLICE_BYTES``; once one read has taken ``_TICK_BUDGET_S``
of the loop, the rest waits (reading paused) for the loop's next round, so that a burst of
cheap frames that are costly in bulk (60,000 DTMF events, a ping flood: uvloop reads a
connection up to 32 times a wake-up) cannot hold every other stream for a second.

Every write goes through ``_write``, which aborts a connection whose unsent bytes pass the
gate's limit (a client that pings and never reads its pongs), and the gate counts the
connection (admitted at accept by ``receiver.listener``) as a handshake in progress until its
handler starts or it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidMessage,
)
from websockets.frames import OK_CLOSE_CODES
from websockets.protocol import State
from websockets.typing import Data

from receiver.frames import TextFrames
from receiver.gate import ConnectionGate, PendingHandshake

# Reading pauses while this much received text waits for the consumer (websockets' own queue
# pauses at 16 messages): a bound on each connection's memory when the handler is not reading.
_PAUSE_AT_BYTES = 256 * 1024
# One read is handed on this much at a time, and yields the loop once it has taken the budget:
# 4 KiB is ~680 empty pings (~10 ms for websockets to answer) or 3 media frames (~0.1 ms).
_SLICE_BYTES = 4096
_TICK_BUDGET_S = 0.005

_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 12\r\nConnection: close\r\n\r\nbad request\n"
)

T = TypeVar("T")
# What a consumer says after a batch: None to go on, anything else ends consume() with it.
Consumer = Callable[[Sequence[Data]], T | None]
_HANDED_BACK: Any = object()


class StreamConnection(ServerConnection):
    """A server connection whose handler may take its text frames in batches."""

    # Set per server (``receiver.server``): websockets' max_size, for the splitter; the gate.
    max_message_bytes = 65_536
    gate: ConnectionGate

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peer_ip = "unknown"
        # Set by the listener: the gate's count of this handshake, until the handler starts.
        self.pending_handshake: PendingHandshake | None = None
        self._live = False  # a handler reads the stream: what websockets sends waits
        self._deferred: list[bytes] = []  # what websockets sent while live, until release()
        self._closing: asyncio.Future[None] | None = None  # done once something was deferred
        self._answered_bad_request = False
        self.keepalive_expired = False
        self.write_overflow = False
        self._frames: TextFrames | None = None
        self._ready: list[str] = []
        self._ready_bytes = 0
        self._consumer: Consumer[Any] | None = None
        self._outcome: asyncio.Future[Any] | None = None
        self._reading_paused = False
        self._backlog: bytearray | None = None  # the rest of a read, while the loop is yielded
        self._ended = False  # the consumer ended the stream (returned or raised)
        self._held = bytearray()  # what came after that, until release()

    def take_over(self) -> bool:
        """Split frames here from now on, if websockets stands at a frame boundary.

        That is when the connection is open and websockets holds no byte and no message yet,
        which is how the platform's first message finds it. Otherwise (a client that sent before
        the handshake's response, a websockets without these attributes) websockets keeps the
        stream and ``consume`` takes its messages one by one. Returns whether it took over.
        """
        self._live = True
        buffered = getattr(getattr(self.protocol, "reader", None), "buffer", None)
        queued = getattr(self.recv_messages, "frames", None)
        if (
            self.protocol.state is not State.OPEN
            or buffered is None
            or len(buffered)
            or queued is None
            or len(queued)
        ):
            return False
        self._frames = TextFrames(max_size=self.max_message_bytes)
        return True

    async def consume(self, consumer: Consumer[T]) -> T:
        """Give every message, in order, to ``consumer`` until it returns something; return that.

        On the fast path the consumer runs inside ``data_received``, with all that one read
        brought; otherwise (websockets' path, or after the splitter handed back) one message at a
        time from ``recv()``. What the consumer raises is raised here, and so is
        ``ConnectionClosed`` once every message before the end was consumed.
        """
        self._live = True
        while True:
            if self._ready:
                ready, self._ready, self._ready_bytes = self._ready, [], 0
                self._resume()
                end = self._call(consumer, ready)
                if end is not None:
                    return end
            elif self._deferred and not self._queued():
                raise self._close_exc()
            elif self._frames is not None:
                self._outcome = self.loop.create_future()
                self._consumer = consumer
                try:
                    outcome = await self._outcome
                finally:
                    self._consumer = self._outcome = None
                if outcome is not _HANDED_BACK:
                    return outcome  # type: ignore[no-any-return]
            else:
                message = await self._recv_unless_closing()
                if message is not None:
                    end = self._call(consumer, [message])
                    if end is not None:
                        return end

    async def _recv_unless_closing(self) -> Data | None:
        """websockets' ``recv()``, or None once something it sent was deferred."""
        if self._closing is None:
            self._closing = self.loop.create_future()
        if self._closing.done():
            return None
        recv = self.loop.create_task(self.recv())
        waits: set[asyncio.Future[Any]] = {recv, self._closing}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not recv.done():
                recv.cancel()  # recv() is cancellation-safe: a message it had is not lost
        if recv.done() and not recv.cancelled():
            return recv.result()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await recv
        return None

    def _queued(self) -> bool:
        """Messages websockets parsed that ``recv()`` has not handed out yet."""
        frames = getattr(self.recv_messages, "frames", None)
        return bool(frames is not None and len(frames))

    def _close_exc(self) -> ConnectionClosed:
        """The ``ConnectionClosed`` websockets will raise, built before the connection is closed."""
        rcvd, sent = self.protocol.close_rcvd, self.protocol.close_sent
        ok = (
            rcvd is not None
            and sent is not None
            and rcvd.code in OK_CLOSE_CODES
            and sent.code in OK_CLOSE_CODES
        )
        kind = ConnectionClosedOK if ok else ConnectionClosedError
        return kind(rcvd, sent, self.protocol.close_rcvd_then_sent)

    def release(self) -> None:
        """Files finished (or the client gone): what websockets sent meanwhile goes out,
        websockets gets every byte held, and reads on."""
        self._drain_backlog()
        self._live = False
        deferred, self._deferred = self._deferred, []
        if deferred and not self.transport.is_closing():
            self._write(deferred)
        self._resume()
        if self._frames is not None:
            held, self._held = self._frames.buffered + self._held, bytearray()
            self._hand_back(bytes(held))

    def handshake_over(self) -> None:
        """The handshake is done (or failed): no longer counted as pending by the gate."""
        if self.pending_handshake is not None:
            self.pending_handshake.release()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "unknown"
        super().connection_made(transport)

    def send_data(self) -> None:
        """As websockets' (with our write-buffer check), but while the stream is live a close
        websockets sends by itself waits for ``release()``."""
        if self._live and self.protocol.state is not State.OPEN:
            self._deferred.extend(self.protocol.data_to_send())
            if self._deferred:
                if asyncio.current_task() is getattr(self, "keepalive_task", None):
                    self.keepalive_expired = True
                if self._closing is None:
                    self._closing = self.loop.create_future()
                if not self._closing.done():
                    self._closing.set_result(None)
                self._wake()
            return
        handshake_exc = self.protocol.handshake_exc
        if (
            self.request is None
            and isinstance(handshake_exc, InvalidMessage)
            and not isinstance(handshake_exc.__cause__, EOFError)
            and not self._answered_bad_request
        ):
            # websockets could not parse the request and would just hang up: answer 400.
            self._answered_bad_request = True
            self.gate.bad_request(self.peer_ip, reason="unparsable", detail=str(handshake_exc))
            self.transport.write(_BAD_REQUEST)
        self._write(self.protocol.data_to_send())

    def _write(self, chunks: Iterable[bytes]) -> None:
        for data in chunks:
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                with contextlib.suppress(Exception):  # uvloop may raise RuntimeError
                    self.transport.write_eof()
            else:
                self.transport.close()
        buffered = self.transport.get_write_buffer_size()
        if buffered > self.gate.max_write_buffer_bytes and not self.write_overflow:
            # A client that sends (pings) and never reads would have us buffer without end.
            self.write_overflow = True
            self.gate.write_overflow(self.peer_ip, buffered_bytes=buffered)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._backlog is not None:
            self._backlog += data  # came while the loop is yielded: it waits its turn
        elif len(data) <= _SLICE_BYTES:
            self._receive(data)
        else:
            self._receive_sliced(data)

    def _receive_sliced(self, data: bytes) -> None:
        """``data`` a slice at a time; past the budget, the rest waits for the next round."""
        started = time.perf_counter()
        view = memoryview(data)
        for offset in range(0, len(data), _SLICE_BYTES):
            if offset and time.perf_counter() - started > _TICK_BUDGET_S:
                self._backlog = bytearray(view[offset:])
                if not self._reading_paused:
                    self.transport.pause_reading()
                self.loop.call_soon(self._continue)
                return
            self._receive(bytes(view[offset : offset + _SLICE_BYTES]))

    def _continue(self) -> None:
        """The loop's next round: hand on the rest of the read, then read again."""
        backlog, self._backlog = self._backlog, None
        if backlog is None:
            return  # drained already (the connection ended)
        self._receive_sliced(bytes(backlog))
        if self._backlog is None and not self._reading_paused and not self._queue_paused():
            self.transport.resume_reading()

    def _drain_backlog(self) -> None:
        """The connection ends: what waits of a read is handed on at once, never lost."""
        backlog, self._backlog = self._backlog, None
        if backlog:
            self._receive(bytes(backlog))

    def _queue_paused(self) -> bool:
        """websockets' own message queue paused reading (on its path)."""
        return self._frames is None and bool(getattr(self.recv_messages, "paused", False))

    def _receive(self, data: bytes) -> None:
        frames = self._frames
        if frames is None:
            super().data_received(data)
            return
        if self._ended:
            self._hold(data)
            return
        split = frames.feed(data)
        for frame in split.control:
            super().data_received(frame)
        if split.messages:
            self._deliver(split.messages, len(data))
        if split.handback is not None:
            if self._ended:
                self._hold(split.handback)
            else:
                self._hand_back(split.handback)

    def eof_received(self) -> None:
        self._drain_backlog()
        self.release()  # the client is gone: websockets reports what is incomplete
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._drain_backlog()
        self.handshake_over()
        self.gate.closed()
        self._frames = None
        super().connection_lost(exc)
        self._wake()

    def _deliver(self, messages: list[str], size: int) -> None:
        """To the consumer now if it waits, else kept in order for ``consume``."""
        consumer, outcome = self._consumer, self._outcome
        if consumer is not None and outcome is not None and not outcome.done():
            try:
                end = self._call(consumer, messages)
            except Exception as exc:  # noqa: BLE001 - raised in consume(), in the handler
                outcome.set_exception(exc)
            else:
                if end is not None:
                    outcome.set_result(end)
            return
        self._ready.extend(messages)
        self._ready_bytes += size
        if self._ready_bytes > _PAUSE_AT_BYTES:
            self._pause()

    def _call(self, consumer: Consumer[T], messages: Sequence[Data]) -> T | None:
        try:
            end = consumer(messages)
        except BaseException:
            self._ended = True
            raise
        if end is not None:
            self._ended = True
        return end

    def _hold(self, data: bytes) -> None:
        self._held += data
        self._pause()

    def _pause(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            if self._backlog is None:  # else paused already, for the loop's next round
                self.transport.pause_reading()

    def _resume(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._backlog is None:  # else _continue resumes once the read is handed on
                self.transport.resume_reading()

    def _hand_back(self, data: bytes) -> None:
        """websockets parses everything from ``data`` on; ``consume`` goes on with it."""
        self._frames = None
        if data:
            super().data_received(data)
        self._wake()

    def _wake(self) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(_HANDED_BACK)
