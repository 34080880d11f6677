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
end, before the last batch was written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State
from websockets.typing import Data

from receiver.frames import TextFrames

# Reading pauses while this much received text waits for the consumer (websockets' own queue
# pauses at 16 messages): a bound on each connection's memory when the handler is not reading.
_PAUSE_AT_BYTES = 256 * 1024

T = TypeVar("T")
# What a consumer says after a batch: None to go on, anything else ends consume() with it.
Consumer = Callable[[Sequence[Data]], T | None]
_HANDED_BACK: Any = object()


class StreamConnection(ServerConnection):
    """A server connection whose handler may take its text frames in batches."""

    # Set per server (``receiver.server``): websockets' max_size, for the splitter.
    max_message_bytes = 65_536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frames: TextFrames | None = None
        self._ready: list[str] = []
        self._ready_bytes = 0
        self._consumer: Consumer[Any] | None = None
        self._outcome: asyncio.Future[Any] | None = None
        self._reading_paused = False
        self._ended = False  # the consumer ended the stream (returned or raised)
        self._held = bytearray()  # what came after that, until release()

    def take_over(self) -> bool:
        """Split frames here from now on, if websockets stands at a frame boundary.

        That is when the connection is open and websockets holds no byte and no message yet,
        which is how the platform's first message finds it. Otherwise (a client that sent before
        the handshake's response, a websockets without these attributes) websockets keeps the
        stream and ``consume`` takes its messages one by one. Returns whether it took over.
        """
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
        while True:
            if self._ready:
                ready, self._ready, self._ready_bytes = self._ready, [], 0
                self._resume()
                end = self._call(consumer, ready)
                if end is not None:
                    return end
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
                end = self._call(consumer, [await self.recv()])
                if end is not None:
                    return end

    def release(self) -> None:
        """Files finished (or the client gone): websockets gets every byte held, and reads on."""
        self._resume()
        if self._frames is not None:
            held, self._held = self._frames.buffered + self._held, bytearray()
            self._hand_back(bytes(held))

    def data_received(self, data: bytes) -> None:
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
        self.release()  # the client is gone: websockets reports what is incomplete
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
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
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
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
