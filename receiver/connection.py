"""Our connection layer: bytes in, TLS, HTTP routes, a WebSocket, and the platform's frames.

One ``Connection`` (an ``asyncio.Protocol`` on a plain TCP transport) per client, in phases:

1. **TLS** through ``ssl.MemoryBIO`` (``TlsSession``): the transport carries ciphertext, so
   reading can be paused and resumed like any TCP socket's.
2. **HTTP** through h11 (``receiver.http.HttpParser``): a request for a route (``/healthz``,
   ``/metrics``, the status callbacks: any method, bodies bounded, keep-alive) goes to its
   handler; any other is a stream: the bearer gate (``StreamPort.admit``), then websockets'
   sans-I/O ``ServerProtocol.accept`` validates the upgrade and builds the 101.
3. **WebSocket**: ``receiver.frames.TextFrames`` splits the platform's text frames off the hot
   path and hands every message a read brought to the stream's consumer straight from
   ``data_received`` (no task wake-up a read). Pings, pongs and whatever the splitter hands
   back go to a websockets ``ServerProtocol`` (``state=OPEN``), which answers pings, runs the
   close handshake and refuses bad frames (1002, 1007, 1009).

**Read coalescing**: once the WebSocket is open, a connection's reading is paused after each
read and resumed ``RECEIVER_READ_INTERVAL_MS`` later by ``ReadTicks``, so the kernel gathers
the frames of that interval and one ``recv``, one decrypt and one Python call serve them all.
A read that brings a lot (a client sending faster than real time) is not paused: coalescing
buys nothing there and would only slow it down.

While a stream is live, what the protocol sends by itself once the connection is closing (its
echo of a client's close, its close for a refused frame or a lost keepalive) waits until the
handler calls ``release()`` after finishing the files (a client's half-close keeps the
transport open for it), and reading pauses once the consumer ended the stream: a client that
sees the close finds every file complete.

Bounds: a read is handed on in slices of ``_SLICE_BYTES`` and yields the loop once it has taken
``_TICK_BUDGET_S``; reading pauses while ``_PAUSE_AT_BYTES`` of messages wait for the
consumer; every write checks the transport's buffer against the gate's limit (a client that
pings and never reads its pongs is aborted); the handshake (TLS and request) and every
keep-alive wait have ``RECEIVER_HANDSHAKE_TIMEOUT_S``; a close has ``RECEIVER_CLOSE_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.frames import OK_CLOSE_CODES, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Data, LoggerLike

from receiver.frames import TextFrames
from receiver.gate import ConnectionGate, PendingHandshake
from receiver.http import (
    SERVER_NAME,
    HttpParser,
    HttpRequest,
    HttpResponse,
    Malformed,
    Route,
    serialize_closing,
)

logger = logging.getLogger("receiver.connection")

# Reading pauses while this much received text waits for the consumer: a bound on each
# connection's memory when the handler is not reading.
_PAUSE_AT_BYTES = 256 * 1024
# A read is handed on this much at a time, and yields the loop once it has taken the budget:
# 16 KiB is ~2,700 empty pings (~25 ms for websockets to answer them) or ~50 media frames
# (~0.3 ms); a coalesced read of a paced stream (~7 KiB in 100 ms) goes whole.
_SLICE_BYTES = 16 * 1024
_TICK_BUDGET_S = 0.005
# A read this large means the client is ahead of real time: read on, do not coalesce.
_BIG_READ_BYTES = 64 * 1024
# Decrypted records are gathered here (one buffer for every connection: the loop has one
# thread, and each read copies its plaintext out before the next).
_PLAINTEXT = bytearray(256 * 1024)
_PLAINTEXT_VIEW = memoryview(_PLAINTEXT)
# Ciphertext goes into a connection's TLS object at most this much at a time: its incoming
# buffer keeps the room of the largest write for the connection's life (OpenSSL's memory BIO
# does not shrink), so one 256 KiB read (uvloop's most) pinned 344 KiB of native memory a
# connection; in 8 KiB slices it keeps 10.9 KiB (mallinfo2, 300 connections), and a paced
# stream's coalesced read (~7 KiB) still goes in whole.
_CIPHERTEXT_SLICE_BYTES = 8 * 1024
# TLS handshakes a loop round may spend before the rest wait for the next round.
_HANDSHAKES_A_ROUND_S = 0.010
# Coalesced reads are resumed in this many slots an interval, so that the connections' reads
# stay spread over the interval instead of all coming due at one instant.
_SLOTS_AN_INTERVAL = 8

T = TypeVar("T")
# What a consumer says after a batch: None to go on, anything else ends consume() with it.
Consumer = Callable[[Sequence[Data]], T | None]
_HANDED_BACK: Any = object()


def _slices(data: bytes) -> Sequence[bytes | memoryview]:
    """``data`` in pieces of at most ``_CIPHERTEXT_SLICE_BYTES`` (views, not copies)."""
    if len(data) <= _CIPHERTEXT_SLICE_BYTES:
        return (data,)
    whole = memoryview(data)
    return [
        whole[i : i + _CIPHERTEXT_SLICE_BYTES] for i in range(0, len(data), _CIPHERTEXT_SLICE_BYTES)
    ]


class TlsSession:
    """The server side of one TLS connection over memory buffers, without I/O."""

    __slots__ = ("_incoming", "_outgoing", "_ssl", "established", "peer_closed")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False
        self.peer_closed = False  # the client's close_notify came

    def receive(self, data: bytes) -> bytes:
        """Ciphertext in; the plaintext it completes (raises ``ssl.SSLError`` on bad input).

        Every record is read into one shared buffer and copied out once: no allocation a
        record, and no SSLWantReadError raised when the read ends on a record's end. A large
        read goes into the TLS object a slice at a time (``_CIPHERTEXT_SLICE_BYTES``)."""
        incoming, tls = self._incoming, self._ssl
        buffer, view = _PLAINTEXT, _PLAINTEXT_VIEW
        size = len(buffer)
        filled = 0
        chunks: list[bytes] = []
        for piece in _slices(data):
            incoming.write(piece)
            if not self.established:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    continue
                self.established = True
            # Records are read while ciphertext waits; decrypted bytes wait inside the TLS
            # object only when a read filled the buffer (or the handshake's last read brought
            # some).
            more = incoming.pending or tls.pending()
            while more:
                if filled == size:
                    chunks.append(bytes(buffer))
                    filled = 0
                try:
                    count: int = tls.read(size - filled, view[filled:])  # type: ignore[assignment]
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    self.peer_closed = True
                    break
                if not count:  # the client's close_notify (CPython returns no bytes for it)
                    self.peer_closed = True
                    break
                filled += count
                more = incoming.pending or filled == size
            if self.peer_closed:
                break
        if not chunks:
            return bytes(view[:filled])
        chunks.append(bytes(view[:filled]))
        return b"".join(chunks)

    def encrypt(self, data: bytes) -> bytes:
        self._ssl.write(data)
        return self._outgoing.read()

    def outgoing(self) -> bytes:
        """What the handshake (or a ticket, an alert) wants sent."""
        return self._outgoing.read()

    def close_notify(self) -> bytes:
        """Our TLS close, to send before the TCP FIN."""
        # Want-read: the client's close_notify is not needed before ours goes out.
        with contextlib.suppress(ssl.SSLError):
            self._ssl.unwrap()
        return self._outgoing.read()


class ReadTicks:
    """The shared timer of read coalescing: a paused connection is resumed one interval after
    its read, in one of ``_SLOTS_AN_INTERVAL`` slots (one timer a slot, not one a connection)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float) -> None:
        self._loop = loop
        self._interval_s = interval_s
        self._slot_s = interval_s / _SLOTS_AN_INTERVAL
        self._due: dict[int, list[Connection]] = {}

    def defer(self, connection: Connection) -> None:
        slot = math.ceil((self._loop.time() + self._interval_s) / self._slot_s)
        waiting = self._due.get(slot)
        if waiting is None:
            waiting = self._due[slot] = []
            self._loop.call_at(slot * self._slot_s, self._fire, slot)
        waiting.append(connection)

    def _fire(self, slot: int) -> None:
        for connection in self._due.pop(slot, ()):
            connection.tick()


class HandshakeBudget:
    """The TLS handshakes' share of one loop round: past ``budget_s`` (a handshake costs ~1 ms
    of RSA or ECDSA), the next ones wait for the next round, so that a storm of connects is
    spread over rounds and the streams' reads and pings get theirs in between."""

    def __init__(self, loop: asyncio.AbstractEventLoop, budget_s: float = _HANDSHAKES_A_ROUND_S):
        self._loop = loop
        self._budget_s = budget_s
        self._spent_s = 0.0
        self._reset_due = False

    @property
    def exhausted(self) -> bool:
        return self._spent_s >= self._budget_s

    def spend(self, seconds: float) -> None:
        self._spent_s += seconds
        if not self._reset_due:
            self._reset_due = True
            self._loop.call_soon(self._reset)

    def _reset(self) -> None:
        self._spent_s = 0.0
        self._reset_due = False


@dataclass(eq=False)
class StreamPort:
    """What every connection of the stream port shares: limits, routes, the gate, callbacks."""

    gate: ConnectionGate
    admit: Callable[[HttpRequest], HttpResponse | None]  # None: a stream may open
    on_open: Callable[[Connection], None]
    tls_context: ssl.SSLContext | None
    max_message_bytes: int
    handshake_timeout_s: float
    close_timeout_s: float
    ping_interval_s: float
    ping_timeout_s: float
    routes: Mapping[str, Route] = field(default_factory=dict)
    ws_logger: LoggerLike = field(default_factory=lambda: logging.getLogger("websockets.server"))
    connections: set[Connection] = field(default_factory=set)
    ticks: ReadTicks | None = None
    handshakes: HandshakeBudget | None = None

    def body_limit(self, method: str, path: str) -> int:
        route = self.routes.get(path)
        return route.max_body_bytes if route is not None else 0


class Phase(enum.Enum):
    TLS = "tls"
    HTTP = "http"
    WEBSOCKET = "websocket"
    CLOSED = "closed"


class Connection(asyncio.Protocol):
    """One client, from its first byte to its last (see the module docstring)."""

    def __init__(self, port: StreamPort, handshake: PendingHandshake) -> None:
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.peer_ip = handshake.ip
        self.pending_handshake: PendingHandshake | None = handshake
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._tls = TlsSession(port.tls_context) if port.tls_context is not None else None
        self.phase = Phase.TLS if self._tls is not None else Phase.HTTP
        self._http: HttpParser | None = HttpParser(
            peer_ip=self.peer_ip, tls=self._tls is not None, body_limit=port.body_limit
        )
        self._route_task: asyncio.Task[None] | None = None
        self.request: HttpRequest | None = None  # the stream's upgrade request
        self.protocol: ServerProtocol | None = None
        self._frames: TextFrames | None = None
        self._fragments: list[Frame] = []
        self._timer: asyncio.TimerHandle | None = None  # handshake, keep-alive or close
        self._ping: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        self._reading = True
        self._coalescing = False
        self._backlog: bytearray | None = None  # the rest of a read, while the loop is yielded
        self._ready: list[Data] = []
        self._ready_bytes = 0
        self._consumer: Consumer[Any] | None = None
        self._outcome: asyncio.Future[Any] | None = None
        self._live = False  # a handler reads the stream: the protocol's closes wait
        self._ended = False  # the consumer ended the stream (returned or raised)
        self._peer_eof = False  # the client half-closed (TCP FIN or TLS close_notify)
        self._handshake_waiting = bytearray()  # bytes of an opening, waiting for a later round
        self._opening = False  # a stream whose first read is still to come
        self._deferred: list[bytes] = []
        self._eof_sent = False
        self._closed: asyncio.Future[None] = self.loop.create_future()
        self.keepalive_expired = False
        self.write_overflow = False
        self.close_timed_out = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's too)
        self.port.connections.add(self)
        self._arm(self.port.handshake_timeout_s, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        # Opening a stream (its TLS handshake, then its first read: the start, the first files)
        # counts against the loop round's budget; the reads that follow do not.
        budget = self.port.handshakes if self.phase is Phase.TLS or self._opening else None
        if budget is None:
            self._receive_data(data)
            return
        if budget.exhausted:
            self._handshake_later(data)
            return
        started = time.perf_counter()
        try:
            self._receive_data(data)
        finally:
            budget.spend(time.perf_counter() - started)

    def _receive_data(self, data: bytes) -> None:
        plain = data
        if self._tls is not None:
            try:
                plain = self._tls.receive(data)
            except ssl.SSLError as exc:
                self._flush_tls()
                if self.phase is Phase.TLS:
                    self.port.gate.tls_failed(self.peer_ip, exc)
                self.transport.abort()
                return
            self._flush_tls()
            if self.phase is Phase.TLS:
                if not self._tls.established:
                    return
                self.phase = Phase.HTTP
        if plain:
            if self.phase is Phase.HTTP:
                if self._http is not None:  # None: answered and closing; the rest is dropped
                    self._http.receive(plain)
                    self._serve_http()
            elif self.phase is Phase.WEBSOCKET:
                if self._backlog is not None:
                    self._backlog += plain  # came while the loop is yielded: it waits its turn
                elif len(plain) <= _SLICE_BYTES:
                    self._receive(plain)
                else:
                    self._receive_sliced(plain)
                self._opening = False
                if self.port.ticks is not None and len(data) < _BIG_READ_BYTES:
                    self._coalescing = True
                    self.port.ticks.defer(self)
                    self._update_reading()
        if self._tls is not None and self._tls.peer_closed and not self._peer_eof:
            self._tls_closed()

    def _tls_closed(self) -> None:
        """The client's close_notify: its end, as a FIN is (which may follow it)."""
        self._peer_eof = True
        if self.phase is Phase.WEBSOCKET:
            if not self._websocket_eof():
                self.transport.close()
        elif self.phase is Phase.HTTP and self._http is not None:
            # Requests that came before it are answered, then the connection closes; an
            # upgrade among them hands the end on to the WebSocket.
            self._http.receive_eof()
            self._serve_http()
        else:
            self.transport.close()

    def _handshake_later(self, data: bytes) -> None:
        """This round's budget for openings is spent: ``data`` waits for the next round."""
        first = not self._handshake_waiting
        self._handshake_waiting += data
        self._update_reading()
        if first:
            self.loop.call_soon(self._handshake_now)

    def _handshake_now(self) -> None:
        data, self._handshake_waiting = bytes(self._handshake_waiting), bytearray()
        if self.phase is Phase.CLOSED:
            return
        self._update_reading()
        self.data_received(data)

    def eof_received(self) -> bool | None:
        """The client is done sending. A live stream keeps the transport half-open: what the
        protocol answers (its close) waits for the files, as always."""
        self._peer_eof = True
        if self.phase is Phase.WEBSOCKET:
            return self._websocket_eof()
        if self.phase is Phase.HTTP and self._http is not None:
            self._http.receive_eof()
        return None  # the transport closes

    def _websocket_eof(self) -> bool | None:
        self._drain_backlog()
        assert self.protocol is not None
        self.protocol.receive_eof()  # the protocol reports what is incomplete
        self._send_protocol_data()
        self._wake()
        return self._live or None  # True: keep the transport for the close after the files

    def connection_lost(self, exc: Exception | None) -> None:
        self._drain_backlog()
        self.phase = Phase.CLOSED
        self._disarm()
        if self._ping is not None:
            self._ping.cancel()
        if self.protocol is not None and self.protocol.state is not State.CLOSED:
            self.protocol.receive_eof()
            self.protocol.data_to_send()
        if self._route_task is not None:
            self._route_task.cancel()
        self._frames = None
        self._http = None
        self.handshake_over()
        self.port.gate.closed()
        self.port.connections.discard(self)
        if not self._closed.done():
            self._closed.set_result(None)
        self._wake()

    # Timers

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handshake_expired(self) -> None:
        """No complete TLS handshake and request in time (or a keep-alive left idle)."""
        self._timer = None
        if self.phase is Phase.TLS:
            self.port.gate.tls_failed(self.peer_ip, TimeoutError())
        if self.phase in (Phase.TLS, Phase.HTTP):
            self.transport.abort()

    def handshake_over(self) -> None:
        """The handshake is done (or failed): no longer counted as pending by the gate."""
        if self.pending_handshake is not None:
            self.pending_handshake.release()
            self.pending_handshake = None

    # Writing

    def _write(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._tls is not None:
            data = self._tls.encrypt(data)
        self.transport.write(data)
        self._check_write_buffer()

    def _flush_tls(self) -> None:
        assert self._tls is not None
        out = self._tls.outgoing()
        if out and not self.transport.is_closing():
            self.transport.write(out)
            self._check_write_buffer()

    def _check_write_buffer(self) -> None:
        buffered = self.transport.get_write_buffer_size()
        if buffered > self.port.gate.max_write_buffer_bytes and not self.write_overflow:
            # A client that sends (pings) and never reads would have us buffer without end.
            self.write_overflow = True
            self.port.gate.write_overflow(self.peer_ip, buffered_bytes=buffered)
            self.transport.abort()
            self._wake()

    def _send_eof(self) -> None:
        """Our side is done: TLS close_notify, then the TCP FIN; the client has the close
        timeout to close its side."""
        if self._eof_sent or self.transport.is_closing():
            return
        self._eof_sent = True
        if self._tls is not None:
            self.transport.write(self._tls.close_notify())
        if self._peer_eof:  # both sides are done: close once what is buffered is sent
            self.transport.close()
        elif self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except (OSError, RuntimeError):
                self.transport.close()
        else:
            self.transport.close()
        self._arm(self.port.close_timeout_s, self._close_expired)

    def _close_expired(self) -> None:
        self._timer = None
        if self.phase is not Phase.CLOSED:
            self.close_timed_out = True
            self.transport.abort()

    # Reading control

    def _update_reading(self) -> None:
        want = not (
            self._coalescing
            or self._backlog is not None
            or self._ready_bytes > _PAUSE_AT_BYTES
            or (self._ended and self._live)
            or self._route_task is not None
            or bool(self._handshake_waiting)
        )
        if want is self._reading or self.transport.is_closing():
            return
        self._reading = want
        if want:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def tick(self) -> None:
        """The read interval is over: read again."""
        self._coalescing = False
        if self.phase is not Phase.CLOSED:
            self._update_reading()

    # HTTP

    def _serve_http(self) -> None:
        while self.phase is Phase.HTTP and self._route_task is None and self._http is not None:
            item = self._http.next()
            if item is None:
                if self._peer_eof and self._route_task is None:
                    self._close_http()  # every request the client sent is answered
                return
            if isinstance(item, Malformed):
                self._refuse_malformed(item)
                return
            self._route(item)

    def _refuse_malformed(self, malformed: Malformed) -> None:
        reason = "too_large" if malformed.status in (413, 431) else "unparsable"
        self.port.gate.bad_request(self.peer_ip, reason=reason, detail=malformed.detail)
        text = "request too large\n" if reason == "too_large" else "bad request\n"
        self._write(serialize_closing(HttpResponse.text(malformed.status, text)))
        self._close_http()

    def _route(self, request: HttpRequest) -> None:
        route = self.port.routes.get(request.path)
        if route is not None:
            if request.method not in route.methods:
                allow = ", ".join(sorted(route.methods))
                self._respond(
                    HttpResponse.text(405, "method not allowed\n", headers=(("Allow", allow),))
                )
                return
            self._route_task = self.loop.create_task(self._run_route(route, request))
            self._update_reading()
            return
        refusal = self.port.admit(request)
        if refusal is not None:
            self._respond(refusal)
            return
        if request.method != "GET":
            self.port.gate.bad_request(self.peer_ip, reason="method", detail=request.method)
            self._respond(HttpResponse.text(405, "GET only\n", headers=(("Allow", "GET"),)))
            return
        self._upgrade(request)

    async def _run_route(self, route: Route, request: HttpRequest) -> None:
        try:
            response = await route.handler(request)
        except Exception:
            logger.exception("route %s failed", request.path)
            response = HttpResponse.text(500, "internal error\n", close=True)
        finally:
            self._route_task = None
        if self.phase is not Phase.HTTP:
            return
        self._respond(response)
        if self.phase is Phase.HTTP:
            self._update_reading()
            self._serve_http()

    def _respond(self, response: HttpResponse) -> None:
        assert self._http is not None
        self._write(self._http.respond(response))
        if self._http.must_close:
            self._close_http()
        else:  # keep-alive: the next request has the handshake timeout to come whole
            self._arm(self.port.handshake_timeout_s, self._handshake_expired)

    def _close_http(self) -> None:
        self._http = None
        self._send_eof()

    def _upgrade(self, request: HttpRequest) -> None:
        """websockets validates the upgrade and builds the 101; then the frames begin."""
        port = self.port
        assert self._http is not None
        handshake = ServerProtocol(max_size=port.max_message_bytes, logger=port.ws_logger)
        response = handshake.accept(Request(request.target, Headers(request.headers)))
        if response.status_code != 101:
            reason = "invalid_handshake" if response.status_code == 400 else "not_websocket"
            detail = str(handshake.handshake_exc)
            port.gate.bad_request(self.peer_ip, reason=reason, detail=detail)
            self._write(response.serialize())
            self._close_http()
            return
        response.headers["Server"] = SERVER_NAME
        rest = self._http.trailing
        self._http = None
        self._write(response.serialize())
        self._disarm()
        self.request = request
        self.phase = Phase.WEBSOCKET
        self.protocol = ServerProtocol(
            state=State.OPEN, max_size=port.max_message_bytes, logger=port.ws_logger
        )
        self._frames = TextFrames(max_size=port.max_message_bytes)
        self._live = True
        self._opening = True  # until its first read
        self.handshake_over()
        self._ping = self.loop.call_later(port.ping_interval_s, self._send_ping)
        port.on_open(self)
        if rest:
            self._receive(rest)
        if self._peer_eof and not self._websocket_eof():  # the client ended with its request
            self.transport.close()

    # WebSocket: reading

    def _receive_sliced(self, data: bytes) -> None:
        """``data`` a slice at a time; past the budget, the rest waits for the next round."""
        started = time.perf_counter()
        view = memoryview(data)
        for offset in range(0, len(data), _SLICE_BYTES):
            if offset and time.perf_counter() - started > _TICK_BUDGET_S:
                self._backlog = bytearray(view[offset:])
                self._update_reading()
                self.loop.call_soon(self._continue)
                return
            self._receive(bytes(view[offset : offset + _SLICE_BYTES]))

    def _continue(self) -> None:
        """The loop's next round: hand on the rest of the read, then read again."""
        backlog, self._backlog = self._backlog, None
        if backlog is None:
            return  # drained already (the connection ended)
        self._receive_sliced(bytes(backlog))
        if self._backlog is None and self.phase is not Phase.CLOSED:
            self._update_reading()

    def _drain_backlog(self) -> None:
        """The connection ends: what waits of a read is handed on at once, never lost."""
        waiting, self._handshake_waiting = self._handshake_waiting, bytearray()
        if waiting and self.phase is Phase.WEBSOCKET:  # a first read, behind others' openings
            self._receive_data(bytes(waiting))
        backlog, self._backlog = self._backlog, None
        if backlog:
            self._receive(bytes(backlog))

    def _receive(self, data: bytes) -> None:
        frames = self._frames
        if frames is None:
            self._feed_protocol(data)
            return
        split = frames.feed(data)
        if split.control:  # pings and pongs: websockets answers them all, in one write
            self._feed_protocol(b"".join(split.control))
        if split.messages:
            self._deliver(split.messages, len(data))
        if split.handback is not None:
            self._frames = None
            if split.handback:
                self._receive(split.handback)

    def _feed_protocol(self, data: bytes) -> None:
        protocol = self.protocol
        assert protocol is not None
        if protocol.state is State.CLOSED:
            return
        protocol.receive_data(data)
        for frame in protocol.events_received():
            assert isinstance(frame, Frame)  # the request went to h11: only frames come
            opcode = frame.opcode
            if opcode is Opcode.PONG:
                self._pong(bytes(frame.data))
            elif opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                utf8 = self._assemble(frame)
                if not utf8:
                    break  # failed (1007): no message after it is read, as with websockets
        self._send_protocol_data()
        if protocol.state is not State.OPEN:
            self._wake()

    def _assemble(self, frame: Frame) -> bool:
        """A message from frames the splitter left to websockets (fragmented, binary); False
        if it is text that is not UTF-8 (the connection is failed)."""
        self._fragments.append(frame)
        if not frame.fin:
            return True  # websockets bounds the message's size as its fragments come
        fragments, self._fragments = self._fragments, []
        payload = b"".join(bytes(f.data) for f in fragments)
        message: Data = payload
        if fragments[0].opcode is Opcode.TEXT:
            try:
                message = payload.decode()
            except UnicodeDecodeError as exc:
                assert self.protocol is not None
                self.protocol.fail(1007, f"{exc.reason} at position {exc.start}")
                return False
        self._deliver([message], len(payload))
        return True

    def _deliver(self, messages: Sequence[Data], size: int) -> None:
        """To the consumer now if it waits, else kept in order for ``consume``."""
        if not self._live or self._ended:
            return  # after the stream's end: nothing reads them
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
        self._update_reading()

    def _call(self, consumer: Consumer[T], messages: Sequence[Data]) -> T | None:
        try:
            end = consumer(messages)
        except BaseException:
            self._ended = True
            self._update_reading()
            raise
        if end is not None:
            self._ended = True  # what comes next is not read until release()
            self._update_reading()
        return end

    # WebSocket: what the protocol sends

    def _send_protocol_data(self) -> None:
        assert self.protocol is not None
        data = self.protocol.data_to_send()
        if not data:
            return
        if self._live and self.protocol.state is not State.OPEN:
            self._deferred.extend(data)  # a close: after the files are finished
            return
        self._write_frames(data)

    def _write_frames(self, chunks: Sequence[bytes]) -> None:
        if len(chunks) > 1 and all(chunks):
            chunks = [b"".join(chunks)]  # many pongs: one TLS record, one write
        for data in chunks:
            if data:
                self._write(data)
            else:
                self._send_eof()
        protocol = self.protocol
        if protocol is not None and protocol.close_sent is not None and self._timer is None:
            self._arm(self.port.close_timeout_s, self._close_expired)

    def _send_ping(self) -> None:
        self._ping = None
        protocol = self.protocol
        if protocol is None or protocol.state is not State.OPEN:
            return
        self._ping_payload = os.urandom(4)
        protocol.send_ping(self._ping_payload)
        self._send_protocol_data()
        self._ping = self.loop.call_later(self.port.ping_timeout_s, self._ping_expired)

    def _pong(self, payload: bytes) -> None:
        if self._ping_payload is not None and bytes(payload) == self._ping_payload:
            self._ping_payload = None
            if self._ping is not None:
                self._ping.cancel()
            self._ping = self.loop.call_later(self.port.ping_interval_s, self._send_ping)

    def _ping_expired(self) -> None:
        self._ping = None
        protocol = self.protocol
        if protocol is None or protocol.state is not State.OPEN:
            return
        self.keepalive_expired = True
        protocol.fail(1011, "keepalive ping timeout")
        self._send_protocol_data()
        self._wake()

    # The handler's side

    async def consume(self, consumer: Consumer[T]) -> T:
        """Give every message, in order, to ``consumer`` until it returns something; return that.

        The consumer runs inside ``data_received``, with all that one read brought (or here,
        with what came before it waited). What it raises is raised here, and so is
        ``ConnectionClosed`` once every message before the end was consumed.
        """
        while True:
            if self._ready:
                ready, self._ready, self._ready_bytes = self._ready, [], 0
                self._update_reading()
                end = self._call(consumer, ready)
                if end is not None:
                    return end
            elif self._is_closing():
                raise self._close_exc()
            else:
                self._outcome = self.loop.create_future()
                self._consumer = consumer
                try:
                    outcome = await self._outcome
                finally:
                    self._consumer = self._outcome = None
                if outcome is not _HANDED_BACK:
                    return outcome  # type: ignore[no-any-return]

    def _is_closing(self) -> bool:
        protocol = self.protocol
        return (
            protocol is None
            or protocol.state is not State.OPEN
            or self.phase is Phase.CLOSED
            or self.write_overflow
        )

    def _close_exc(self) -> ConnectionClosed:
        """What ended the connection, as websockets would raise it."""
        protocol = self.protocol
        if protocol is not None and protocol.state is State.CLOSED:
            return protocol.close_exc
        rcvd = protocol.close_rcvd if protocol is not None else None
        sent = protocol.close_sent if protocol is not None else None
        then = protocol.close_rcvd_then_sent if protocol is not None else None
        ok = (
            rcvd is not None
            and sent is not None
            and rcvd.code in OK_CLOSE_CODES
            and sent.code in OK_CLOSE_CODES
        )
        kind = ConnectionClosedOK if ok else ConnectionClosedError
        return kind(rcvd, sent, then)

    def release(self) -> None:
        """Files finished (or the client gone): what the protocol sent meanwhile goes out, and
        reading goes on (what comes now is only the close handshake's)."""
        self._drain_backlog()
        if not self._live:
            return
        self._live = False
        deferred, self._deferred = self._deferred, []
        if deferred:
            self._write_frames(deferred)
        if self.phase is not Phase.CLOSED:
            self._update_reading()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send our close (if the connection is still open) and wait, up to the close
        timeout, for the client's; then the connection is closed."""
        protocol = self.protocol
        if protocol is not None and protocol.state is State.OPEN and self.phase is Phase.WEBSOCKET:
            protocol.send_close(code, reason)
            self._send_protocol_data()
        elif self.phase is not Phase.CLOSED and self._timer is None:
            self._arm(self.port.close_timeout_s, self._close_expired)
        await asyncio.shield(self._closed)

    def going_away(self) -> None:
        """The server shuts down: a stream gets 1001 (after its files), anything else ends."""
        if self.phase is Phase.WEBSOCKET:
            protocol = self.protocol
            assert protocol is not None
            if protocol.state is State.OPEN:
                protocol.send_close(1001, "server shutting down")
                self._send_protocol_data()
                self._wake()
        elif self.phase is not Phase.CLOSED:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def _wake(self) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(_HANDED_BACK)
