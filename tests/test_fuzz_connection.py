"""Fuzzing the whole connection layer against websockets alone: any upgrade request and any
frames a client may send, as real TLS ciphertext or plain bytes, cut into any reads with read
ticks and loop turns between them and a consumer that is not always waiting, give what
websockets' ``ServerProtocol`` gives fed the same request and frames: the same handshake answer,
messages in the same order, the same pongs and close written back, the same end.

The ``Connection`` is ours and real (its ``StreamPort`` built as ``Receiver._listen`` builds it:
a real ``ConnectionGate``, the real bearer gate, ``ReadTicks``); so is the client's TLS (an
``ssl.SSLObject`` over memory buffers). Only the TCP transport is a stand-in that records what
is written and honours pause/resume as asyncio's does: asyncio's transport is not ours.
Not covered here: timers (handshake, keepalive, close timeouts never fire), a client that
does not read (the write buffer is always empty), our close racing the client's frames (the
handler closes once every byte is in), malformed HTTP and refused tokens (see test_e2e and
test_shell_limits).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Data

from receiver import connection as connection_module
from receiver import tls
from receiver.auth import HEALTH_PATH, TokenChecker, health_route, stream_gate
from receiver.connection import Connection, ReadTicks, StreamPort
from receiver.gate import ConnectionGate
from receiver.metrics import Count, Counters
from tests.support.fuzzing import fuzz
from tests.support.receiver import TlsFiles
from tests.support.strategies import (
    OP_CLOSE,
    OP_TEXT,
    SPLIT_MAX_SIZE,
    build_frame,
    client_frame,
)

TOKEN = "fuzz-token"
PEER_IP = "192.0.2.7"
NEVER_S = 3600.0  # timers (handshake, close, keepalive, read ticks) that must not fire here
STOP = "stop"  # what the consumer returns to end the stream, as the handler does at a stop
# A health check on the same connection before the upgrade (keep-alive), as probes may do.
HEALTH_CHECK = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
# Rounds of (tick, loop turn) after which a paused connection that has not resumed is stuck.
_STUCK_ROUNDS = 200

# ---------------------------------------------------------------------------------------------
# The wire: a recording TCP transport, and the client's side of TLS.


class RecordingTransport(asyncio.Transport):
    """A TCP transport stand-in: records writes, EOF and pause/resume, and closes as asyncio's
    does (``connection_lost`` on a later loop turn; no write after ``write_eof``)."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self.written = bytearray()
        self.reading = True
        self.pauses: list[str] = []
        self.closing = False
        self.aborted = False
        self.eof_written = False
        self.lost = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")  # as asyncio's
        assert not self.closing, "a write after close()"
        self.written += data

    def take(self) -> bytes:
        out = bytes(self.written)
        self.written.clear()
        return out

    def get_write_buffer_size(self) -> int:
        return 0  # the client reads everything at once

    def is_closing(self) -> bool:
        return self.closing

    def is_reading(self) -> bool:
        return self.reading and not self.closing

    def pause_reading(self) -> None:
        assert not self.lost, "pause_reading() after connection_lost()"
        self.pauses.append("pause")
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.lost, "resume_reading() after connection_lost()"
        self.pauses.append("resume")
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        assert not self.closing, "write_eof() after close()"
        self.eof_written = True

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self._loop.call_soon(self._lose)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def _lose(self) -> None:
        self.lost = True
        self._protocol.connection_lost(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class PlainClient:
    """The client's bytes as they are: what it sends is the plaintext, what it reads too."""

    def __init__(self, plaintext: bytes) -> None:
        self._outgoing = bytearray(plaintext)
        self.received = bytearray()
        self.closed_by_server = False

    def outgoing(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def receive(self, data: bytes) -> None:
        self.received += data

    def close_notify(self) -> bytes:
        return b""


class TlsClient:
    """The client's side of TLS, a real ``ssl.SSLObject``: its handshake, then the plaintext
    encrypted in the given writes (so TLS records end where the writes do), then its
    close_notify at once if ``close_after``."""

    def __init__(
        self, context: ssl.SSLContext, writes: Sequence[bytes], *, close_after: bool
    ) -> None:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_hostname="localhost")
        self._writes = list(writes)
        self._close_after = close_after
        self.handshaken = False
        self.received = bytearray()
        self.closed_by_server = False  # the server's close_notify came
        self._pump()

    def outgoing(self) -> bytes:
        return self._outgoing.read()

    def receive(self, data: bytes) -> None:
        if data:
            self._incoming.write(data)
            self._pump()

    def close_notify(self) -> bytes:
        self._shut_down()
        return self._outgoing.read()

    def _shut_down(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):  # the server's is not needed first
            self._ssl.unwrap()

    def _pump(self) -> None:
        if not self.handshaken:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                return
            self.handshaken = True
            for chunk in self._writes:
                if chunk:
                    self._ssl.write(chunk)
            if self._close_after:
                self._shut_down()  # its close_notify right after the data
        while not self.closed_by_server:
            try:
                chunk = self._ssl.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self.closed_by_server = True
                return
            if not chunk:
                return
            self.received += chunk


@functools.cache
def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    return tls.server_context(cert, key)


@functools.cache
def client_context(cert: Path, tls12: bool) -> ssl.SSLContext:
    context = tls.client_context(cert)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


# ---------------------------------------------------------------------------------------------
# What a client sends: an upgrade request, then frames.

_VALUE_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_BREAKS = [
    "no-upgrade",
    "upgrade-h2c",
    "no-connection",
    "connection-keep-alive",
    "no-key",
    "short-key",
    "two-keys",
    "version-8",
    "no-version",
]


@st.composite
def upgrade_head(draw: st.DrawFn) -> bytes:
    """A WebSocket upgrade as clients write it (header order, case, extras), sometimes with
    one thing websockets refuses; the bearer token is always right (the gate has its tests)."""
    key = base64.b64encode(draw(st.binary(min_size=16, max_size=16))).decode()
    headers: list[tuple[str, str]] = [
        ("Host", draw(st.sampled_from(["localhost", "127.0.0.1:8443", "receiver.example"]))),
        ("Upgrade", draw(st.sampled_from(["websocket", "WebSocket"]))),
        ("Connection", draw(st.sampled_from(["Upgrade", "upgrade", "keep-alive, Upgrade"]))),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
        ("Authorization", f"Bearer {TOKEN}"),
    ]
    extras = [
        ("User-Agent", "SignalWire-Fuzz/1.0"),
        ("Origin", "https://example.com"),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("Sec-WebSocket-Protocol", "audio"),
        ("X-Signature", draw(st.text(_VALUE_CHARS, min_size=1, max_size=24))),
    ]
    headers += draw(st.lists(st.sampled_from(extras), max_size=3, unique=True))
    if draw(st.integers(0, 9)) == 0:
        broken = draw(st.sampled_from(_BREAKS))
        drop = {
            "no-upgrade": "Upgrade",
            "no-connection": "Connection",
            "no-key": "Sec-WebSocket-Key",
        }
        drop["no-version"] = "Sec-WebSocket-Version"
        headers = [(k, v) for k, v in headers if k != drop.get(broken)]
        swap = {
            "upgrade-h2c": ("Upgrade", "h2c"),
            "connection-keep-alive": ("Connection", "keep-alive"),
            "short-key": ("Sec-WebSocket-Key", "c2hvcnQ="),
            "version-8": ("Sec-WebSocket-Version", "8"),
        }
        if broken in swap:
            name, value = swap[broken]
            headers = [(k, value if k == name else v) for k, v in headers]
        if broken == "two-keys":
            headers.append(("Sec-WebSocket-Key", key))
    headers = draw(st.permutations(headers))
    if draw(st.booleans()):
        headers = [(k.lower(), v) for k, v in headers]
    target = draw(st.sampled_from(["/", "/stream", "/stream?call=CA1&x=%20y"]))
    lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@st.composite
def platform_frame(draw: st.DrawFn) -> bytes:
    """A media message as the platform sends it: one masked final text frame of JSON."""
    n = draw(st.integers(0, 10**6))
    # 20 ms of G.711 is 160 bytes; their values do not matter here, only the frame's size.
    size = draw(st.sampled_from([0, 1, 80, 160, 160, 320]))
    audio = base64.b64encode(bytes([n % 256]) * size).decode()
    message = {
        "event": "media",
        "sequenceNumber": str(n),
        "media": {"track": "inbound", "chunk": str(n), "timestamp": str(20 * n), "payload": audio},
        "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
    }
    return build_frame(True, 0, OP_TEXT, True, json.dumps(message).encode(), draw)


# Close payloads websockets refuses or takes: a bad code, a reserved one, a reason not UTF-8,
# a lone byte, an application code.
_ODD_CLOSES = [b"\x03\xe7", b"\x03\xed", b"\x03\xe8\xff", b"\x03", b"\x0f\xa0bye", b"\x03\xe9"]


@st.composite
def odd_close(draw: st.DrawFn) -> bytes:
    return build_frame(True, 0, OP_CLOSE, True, draw(st.sampled_from(_ODD_CLOSES)), draw)


def stream_elements() -> st.SearchStrategy[list[bytes]]:
    """Frames (one element each, two for a fragmented message): runs of the platform's media
    messages (so that reads past 4 KiB come), and every kind ``client_frame`` makes."""
    one = st.one_of(client_frame(), odd_close()).map(lambda f: [f])
    run = st.sampled_from([1, 3, 16, 48]).flatmap(
        lambda n: st.lists(platform_frame(), min_size=n, max_size=n)
    )
    closing = st.sampled_from([b"", b"\x03\xe8", b"\x03\xe8bye"]).flatmap(
        lambda payload: st.builds(
            lambda data: [build_frame(True, 0, OP_CLOSE, True, payload, data.draw)], st.data()
        )
    )
    ends = st.one_of(st.just([]), closing)  # as a client ends a stream, or not
    return st.tuples(st.lists(st.one_of(run, one, run), max_size=10), ends).map(
        lambda drawn: [f for r in [*drawn[0], drawn[1]] for f in r]
    )


# ---------------------------------------------------------------------------------------------
# The reference: websockets' ServerProtocol alone, fed the same request and frames.


@dataclass(frozen=True)
class Outcome:
    """What one side made of a client's bytes."""

    status: int
    accept: str | None  # Sec-WebSocket-Accept of a 101
    body: bytes  # of a refusal
    written: bytes = b""  # the frames sent back (pongs, close), in order
    eof_first: bool = False  # the server ended TCP before the client did
    end: tuple[Any, ...] | None = None  # (exception type, rcvd, sent, rcvd_then_sent)
    messages: tuple[Data, ...] = ()


def ending(exc: ConnectionClosed) -> tuple[Any, ...]:
    return (type(exc), exc.rcvd, exc.sent, exc.rcvd_then_sent)


def _split_writes(chunks: list[bytes]) -> tuple[bytes, bool]:
    return b"".join(chunks), b"" in chunks


def websockets_alone(
    head: bytes, elements: Sequence[bytes], *, stop: bool, fail_after: int | None
) -> tuple[Outcome, int | None]:
    """websockets given the request, then the frames one element at a time; a text message
    that is not UTF-8 fails the connection with 1007 once element ``fail_after`` is parsed
    (where recv() would notice it); with ``stop``, the server closes with 1000 after the
    last frame, as the handler does after a stop. Returns the outcome and the index of the
    element that completed the first message that is not UTF-8 (None if there is none)."""
    ws = ServerProtocol(max_size=SPLIT_MAX_SIZE)
    ws.receive_data(head)
    [request] = ws.events_received()
    response = ws.accept(request)
    ws.send_response(response)
    ws.data_to_send()
    if response.status_code != 101:
        return Outcome(response.status_code, None, bytes(response.body or b"")), None
    accept = response.headers["Sec-WebSocket-Accept"]
    messages: list[Data] = []
    parts: list[Any] = []
    invalid: tuple[int, str] | None = None
    out: list[bytes] = []
    for index, element in enumerate(elements):
        ws.receive_data(element)
        for frame in ws.events_received():
            if frame.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                continue
            parts.append(frame)
            if not frame.fin:
                continue
            payload = b"".join(bytes(f.data) for f in parts)
            text = parts[0].opcode is Opcode.TEXT
            parts = []
            if invalid is not None:
                continue  # after the failure: no message is read
            if text:
                try:
                    messages.append(payload.decode())
                except UnicodeDecodeError as exc:
                    invalid = (index, f"{exc.reason} at position {exc.start}")
            else:
                messages.append(payload)
        if invalid is not None and fail_after is not None and index == fail_after:
            ws.fail(1007, invalid[1])
        out += ws.data_to_send()
    if stop and ws.state is State.OPEN:
        ws.send_close(1000, "")
        out += ws.data_to_send()
    written, eof_first = _split_writes(out)
    ws.receive_eof()
    written += b"".join(ws.data_to_send())
    assert ws.state is State.CLOSED
    outcome = Outcome(101, accept, b"", written, eof_first, ending(ws.close_exc), tuple(messages))
    return outcome, None if invalid is None else invalid[0]


def references(head: bytes, elements: Sequence[bytes], *, stop: bool) -> list[Outcome]:
    """Every outcome websockets may give: one, or one for each element after which a message
    that is not UTF-8 may be noticed (the layer notices it once the read that completes it
    is parsed; websockets, once recv() is called)."""
    outcome, invalid_at = websockets_alone(head, elements, stop=stop, fail_after=None)
    if invalid_at is None:
        return [outcome]
    return [
        websockets_alone(head, elements, stop=stop, fail_after=k)[0]
        for k in range(invalid_at, len(elements))
    ]


# ---------------------------------------------------------------------------------------------
# The layer: a real Connection on a real loop, driven read by read.


@dataclass
class Case:
    """How one run goes: besides the bytes, everything the draws decide up front."""

    tls: bool
    tls12: bool
    coalescing: bool
    slowness: int  # loop turns before the handler starts consuming
    stop_after: int | None  # the consumer ends the stream after this many messages
    close_notify: bool  # the client ends TLS with close_notify before its FIN
    early_end: bool  # it ends right after its data (in the same read), not waiting for us


@dataclass
class Layer:
    """What the test saw of the layer."""

    outcome: Outcome
    pauses: list[str]
    pending_after: int
    pending_per_ip_after: dict[str, int]
    connections_after: int
    closed_count: int
    handler_done: bool
    raised: ConnectionClosed | None
    returned: Any
    messages: list[Data] = field(default_factory=list)
    backlogs: list[int] = field(default_factory=list)  # reads whose rest waited a loop round


READ_SIZES = st.one_of(
    st.integers(1, 3),
    st.integers(1, 200),
    st.integers(200, 2000),
    st.integers(4097, 20_000),
    st.just(1 << 30),
)


def parse_answer(plaintext: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """An HTTP answer the client read: status, headers, body (unless a 101), and the rest."""
    head, sep, rest = plaintext.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP answer: {plaintext[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), lines[0]
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if status != 101:
        size = int(headers.get("content-length", "0"))
        body, rest = rest[:size], rest[size:]
    return status, headers, body, rest


def connection_gate() -> ConnectionGate:
    return ConnectionGate(
        counters=Counters(),
        max_pending_handshakes=4,
        max_pending_handshakes_per_ip=4,
        max_write_buffer_bytes=1 << 30,
    )


def stream_port(
    gate: ConnectionGate,
    *,
    on_open: Callable[[Connection], None],
    tls_context: ssl.SSLContext | None = None,
    ticks: ReadTicks | None = None,
) -> StreamPort:
    """The stream port as ``Receiver._listen`` builds it, with timers that never fire."""
    return StreamPort(
        gate=gate,
        admit=stream_gate(
            check_token=TokenChecker([TOKEN]),
            is_draining=lambda: False,
            connection_gate=gate,
            at_capacity=lambda: False,
            ip_at_capacity=lambda ip: False,
            on_reject=lambda why: gate.counters.add(Count.HANDSHAKE_REJECTIONS, why),
        ),
        on_open=on_open,
        tls_context=tls_context,
        max_message_bytes=SPLIT_MAX_SIZE,
        handshake_timeout_s=NEVER_S,
        close_timeout_s=NEVER_S,
        ping_interval_s=NEVER_S,
        ping_timeout_s=NEVER_S,
        routes={HEALTH_PATH: health_route(is_draining=lambda: False, health=lambda: None)},
        ticks=ticks,
    )


def open_connection(port: StreamPort) -> tuple[Connection, RecordingTransport]:
    handshake = port.gate.admit(PEER_IP)
    assert handshake is not None
    conn = Connection(port, handshake)
    transport = RecordingTransport(conn)
    conn.connection_made(transport)
    return conn, transport


async def run_layer(
    case: Case,
    health_checks: int,
    plaintext: bytes,
    writes: Sequence[bytes],
    draw: Callable[[st.SearchStrategy[Any]], Any],
    contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None,
) -> Layer:
    loop = asyncio.get_running_loop()
    gate = connection_gate()
    counters = gate.counters
    messages: list[Data] = []
    handlers: list[asyncio.Task[None]] = []
    raised: list[ConnectionClosed] = []
    returned: list[Any] = []
    all_sent = asyncio.Event()
    backlogs: list[int] = []

    def consumer(batch: Sequence[Data]) -> str | None:
        messages.extend(batch)
        if case.stop_after is not None and len(messages) >= case.stop_after:
            return STOP
        return None

    async def handle(conn: Connection) -> None:
        """As the server's handler: consume until the end, release, then close."""
        for _ in range(case.slowness):
            await asyncio.sleep(0)
        try:
            returned.append(await conn.consume(consumer))
        except ConnectionClosed as exc:
            raised.append(exc)
        finally:
            conn.release()
        await all_sent.wait()  # our close after every frame: no race with the client's
        await conn.close()

    def on_open(conn: Connection) -> None:
        handlers.append(loop.create_task(handle(conn)))

    port = stream_port(
        gate,
        on_open=on_open,
        tls_context=contexts[0] if contexts else None,
        ticks=ReadTicks(loop, NEVER_S) if case.coalescing else None,  # ticked by hand
    )
    conn, transport = open_connection(port)
    client: PlainClient | TlsClient
    if contexts:
        close_after = case.close_notify and case.early_end
        client = TlsClient(contexts[1], writes, close_after=close_after)
    else:
        client = PlainClient(plaintext)
    pending = bytearray(client.outgoing())

    def exchange() -> None:
        client.receive(transport.take())
        pending.extend(client.outgoing())

    async def unpause() -> None:
        """What resumes a paused read, in some order: a tick, loop turns (the handler, the
        rest of a sliced read)."""
        for _ in range(_STUCK_ROUNDS):
            if transport.is_reading() or transport.closing:
                return
            if draw(st.booleans()):
                conn.tick()
            await asyncio.sleep(0)
            exchange()
        conn.tick()
        await asyncio.sleep(0)
        assert transport.is_reading() or transport.closing, "reading never resumed"

    async def send(more: Callable[[], bool]) -> None:
        """Every pending byte, in reads of any size, with ticks and loop turns between."""
        while (pending or more()) and not transport.closing:
            if not transport.is_reading():
                await unpause()
                continue
            action = draw(st.sampled_from(["read", "read", "read", "tick", "turn"]))
            if action == "tick":
                conn.tick()
            elif action == "turn":
                await asyncio.sleep(0)
            elif pending:
                size = draw(READ_SIZES)
                chunk = bytes(pending[:size])
                del pending[:size]
                conn.data_received(chunk)
                if conn._backlog is not None:  # (a statistic only)
                    backlogs.append(len(chunk))
            else:
                await asyncio.sleep(0)
            exchange()

    async def settle() -> None:
        for _ in range(20):
            if transport.closing:
                return
            await unpause()
            conn.tick()
            await asyncio.sleep(0)
            exchange()

    await send(lambda: isinstance(client, TlsClient) and not client.handshaken)
    if not case.early_end:  # the handler has done all it does before the client ends
        await settle()
        all_sent.set()
        await settle()
    eof_first = transport.eof_written or transport.closing
    if case.close_notify and not case.early_end and not transport.closing:
        pending.extend(client.close_notify())
        await send(lambda: False)
    if not transport.closing:
        await unpause()
        if not conn.eof_received():
            transport.close()  # as asyncio's transport does when eof_received() says so
    all_sent.set()
    for _ in range(50):
        await asyncio.sleep(0)
        exchange()
        if all(task.done() for task in handlers) and transport.lost:
            break
    exchange()
    assert transport.lost, "the connection was never closed"

    frames = bytes(client.received)
    for _ in range(health_checks):  # answered in order, before anything else
        status, _, body, frames = parse_answer(frames)
        assert (status, body) == (200, b"ok\n")
    status, headers, body, frames = parse_answer(frames)
    end = None
    if conn.protocol is not None:  # the end the protocol saw, and consume() raised it
        end = ending(conn.protocol.close_exc)
        assert not raised or ending(raised[0]) == end
    outcome = Outcome(
        status,
        headers.get("sec-websocket-accept") if status == 101 else None,
        body,
        frames,
        eof_first if status == 101 else False,
        end,
        tuple(messages),
    )
    return Layer(
        outcome=outcome,
        pauses=transport.pauses,
        pending_after=gate.pending,
        pending_per_ip_after=dict(gate.pending_per_ip),
        connections_after=len(port.connections),
        closed_count=counters[Count.CONNECTIONS_CLOSED],
        handler_done=all(task.done() for task in handlers),
        raised=raised[0] if raised else None,
        returned=returned[0] if returned else None,
        messages=messages,
        backlogs=backlogs,
    )


# ---------------------------------------------------------------------------------------------
# The property.


@given(upgrade_head(), stream_elements(), st.data())
@fuzz
def test_connection_layer_serves_as_websockets_alone(
    tls_files: TlsFiles, head: bytes, elements: list[bytes], data: st.DataObject
) -> None:
    """Our whole connection layer equals websockets alone for any request and frames, as TLS
    or plain bytes, cut into any reads with pauses: handshake answer, messages, pongs, close,
    end; and the gate's pending count is back to 0."""
    if elements and data.draw(st.integers(0, 9)) == 0:  # the client vanishes mid-frame
        last = elements[-1]
        elements = [*elements[:-1], last[: data.draw(st.integers(0, len(last) - 1))]]
    case = Case(
        tls=data.draw(st.booleans()),
        tls12=data.draw(st.booleans()),
        coalescing=data.draw(st.booleans()),
        slowness=data.draw(st.integers(0, 6)),
        stop_after=data.draw(st.none() | st.integers(1, 8)),
        close_notify=data.draw(st.booleans()),
        early_end=data.draw(st.booleans()),
    )
    health_checks = data.draw(st.sampled_from([0, 0, 0, 1, 2]))
    plaintext = HEALTH_CHECK * health_checks + head + b"".join(elements)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(plaintext)), max_size=3)))
    writes = [plaintext[a:b] for a, b in zip([0, *cuts], [*cuts, len(plaintext)], strict=True)]
    contexts = None
    if case.tls:
        contexts = (
            server_context(tls_files.cert, tls_files.key),
            client_context(tls_files.cert, case.tls12),
        )
    budget = data.draw(st.sampled_from([connection_module._TICK_BUDGET_S, -1.0]))
    pause_at = data.draw(st.sampled_from([connection_module._PAUSE_AT_BYTES, 0, 600]))
    # 517: records straddle the slices in which ciphertext goes into the TLS object.
    tls_slice = data.draw(st.sampled_from([connection_module._CIPHERTEXT_SLICE_BYTES, 517]))
    with pytest.MonkeyPatch.context() as patch:
        # -1: a read past 4 KiB always leaves its rest for the next loop round (the backlog);
        # 0 or 600: reading pauses as soon as messages wait for the consumer.
        patch.setattr(connection_module, "_TICK_BUDGET_S", budget)
        patch.setattr(connection_module, "_PAUSE_AT_BYTES", pause_at)
        patch.setattr(connection_module, "_CIPHERTEXT_SLICE_BYTES", tls_slice)
        layer = asyncio.run(run_layer(case, health_checks, plaintext, writes, data.draw, contexts))

    # Our close (after a stop) goes out only if the client had not ended first.
    stopped = layer.returned is not None and not case.early_end
    expected = references(head, elements, stop=stopped)
    if case.early_end:  # whether our close came before the client's end is a race then
        expected = [replace(e, eof_first=layer.outcome.eof_first) for e in expected]
    got = layer.outcome
    event(f"status {got.status}")
    event(f"outcomes {min(len(expected), 3)}")
    event("consumer stopped" if layer.returned is not None else "consumer to the end")
    if got.end is not None:
        event(f"end {got.end[0].__name__} sent={got.end[2] and got.end[2].code}")
    event(f"messages {min(len(got.messages), 10) // 5 * 5}+")
    event(f"health checks {health_checks}")
    if layer.backlogs:
        event("a read's rest waited a loop round")
    if got.status != 101 or layer.returned is None:
        assert got in expected
    else:  # the consumer ended the stream: it saw the messages up to there, in order
        assert layer.returned == STOP
        assert case.stop_after is not None and len(got.messages) >= case.stop_after
        full = expected[0].messages
        assert got.messages == full[: len(got.messages)]
        assert got in [replace(e, messages=got.messages) for e in expected]

    # The gate counts the handshake over however the connection ended, and its close.
    assert layer.pending_after == 0 and not layer.pending_per_ip_after
    assert layer.connections_after == 0 and layer.closed_count == 1
    assert layer.handler_done
    # Pause and resume alternate (the layer tracks its own reading state).
    assert all(a != b for a, b in zip(layer.pauses, layer.pauses[1:], strict=False))
    assert not layer.pauses or layer.pauses[0] == "pause"
    if got.status == 101:
        assert layer.raised is not None or layer.returned is not None


# ---------------------------------------------------------------------------------------------
# The examples the property found, as plain tests.

HEAD = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\nSec-WebSocket-Version: 13\r\n"
    b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
)


def text_frame(payload: bytes) -> bytes:
    return Frame(Opcode.TEXT, payload).serialize(mask=True)


async def test_bytes_after_a_refused_upgrade_are_dropped() -> None:
    """A request websockets refuses (no Upgrade header) is answered 426 and our side closed;
    what the client sends in a later read is dropped (it raised AssertionError in
    data_received) and the connection ends as usual."""
    gate = connection_gate()
    conn, transport = open_connection(stream_port(gate, on_open=lambda conn: None))
    conn.data_received(HEAD.replace(b"Upgrade: websocket\r\n", b""))
    answer = transport.take()
    assert answer.startswith(b"HTTP/1.1 426 ") and transport.eof_written
    conn.data_received(text_frame(b"too late"))
    assert transport.take() == b""
    assert not conn.eof_received()
    transport.close()
    await asyncio.sleep(0)
    assert transport.lost and gate.pending == 0


async def test_no_message_is_read_after_one_that_is_not_utf8() -> None:
    """A text message that is not UTF-8 fails the connection with 1007; a message after it
    in the same read is not handed on (websockets' recv() returns none after the failure)."""
    gate = connection_gate()
    conn, transport = open_connection(stream_port(gate, on_open=lambda conn: None))
    conn.data_received(HEAD + text_frame(b"\xff") + text_frame(b"after"))
    assert transport.take().startswith(b"HTTP/1.1 101 ")
    got: list[Data] = []
    with pytest.raises(ConnectionClosedError) as raised:
        await conn.consume(got.extend)
    assert got == []
    refusal = Close(1007, "invalid start byte at position 0")
    assert raised.value.sent == refusal
    conn.release()  # the close waited for the handler
    assert transport.take() == Frame(Opcode.CLOSE, refusal.serialize()).serialize(mask=False)
    assert transport.eof_written


async def test_the_clients_close_notify_ends_the_connection(tls_files: TlsFiles) -> None:
    """The client's TLS close_notify ends the connection as its FIN would (CPython's
    SSLObject.read returns no bytes for it, not SSLZeroReturnError)."""
    gate = connection_gate()
    context = server_context(tls_files.cert, tls_files.key)
    conn, transport = open_connection(
        stream_port(gate, on_open=lambda conn: None, tls_context=context)
    )
    client = TlsClient(client_context(tls_files.cert, False), [HEAD], close_after=True)
    while not client.received and not transport.closing:
        conn.data_received(client.outgoing())
        client.receive(transport.take())
    client.receive(transport.take())
    assert client.received.startswith(b"HTTP/1.1 101 ")
    with pytest.raises(ConnectionClosedError):
        await conn.consume(lambda batch: None)
    assert not transport.closing  # a live stream's transport waits for its handler
    conn.release()  # the files are finished: the connection closes, no FIN needed
    assert transport.closing
    await asyncio.sleep(0)
    assert transport.lost and gate.pending == 0
