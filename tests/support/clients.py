"""Raw clients for the soak and chaos tests: TCP, TLS and WebSocket by hand, so that they can
stop anywhere (TCP, TLS, HTTP upgrade, mid-frame, mid-stream), and the attackers of the chaos
tests. Every client is bounded in time and talks to loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from receiver.codecs import CLI_CODECS, codec_for
from receiver.simulate import build_messages
from tests.support.receiver import TOKEN
from tests.support.server_process import ServerProcess
from tests.support.wire import (
    HOST,
    SERVER_NAME,
    close_frame,
    read_frame,
    read_head,
    read_status,
    start_event,
    upgrade_request,
    ws_frame,
)

PCMU = codec_for(CLI_CODECS["pcmu"])
# Attackers connect from other loopback addresses than the good stream and the checks
# (127.0.0.1), so that per-address limits keep them apart as they would on the internet.
ATTACKER_IPS = tuple(f"127.0.0.{n}" for n in range(2, 40))


# ---------------------------------------------------------------------------------------------
# Raw clients: TCP, TLS and WebSocket by hand, so that they can stop anywhere.


@dataclass(frozen=True)
class Target:
    """Where the clients go, with what."""

    port: int
    client_ssl: ssl.SSLContext
    token: str
    handshake_timeout_s: float
    idle_timeout_s: float

    @property
    def wait_s(self) -> float:
        """The most a client waits for the server to act on a timeout, with slack."""
        return 2 * max(self.handshake_timeout_s, self.idle_timeout_s) + 5.0


def client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes of a real TLS ClientHello from ``context``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=SERVER_NAME)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# The connections a client opened, so that ``owned_connections`` can abort whatever a failed
# client left open (one list per asyncio task: each client runs in a task of its own).
_OPENED: ContextVar[list[asyncio.StreamWriter] | None] = ContextVar("_OPENED", default=None)


@contextlib.contextmanager
def owned_connections() -> Iterator[None]:
    """Abort, on the way out, every connection opened inside (however the client ended)."""
    opened: list[asyncio.StreamWriter] = []
    token = _OPENED.set(opened)
    try:
        yield
    finally:
        _OPENED.reset(token)
        for writer in opened:
            if not writer.transport.is_closing():
                writer.transport.abort()


def _owned(
    pair: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    opened = _OPENED.get()
    if opened is not None:
        opened.append(pair[1])
    return pair


async def open_tcp(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return _owned(await asyncio.open_connection(HOST, target.port))


async def open_tls(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return _owned(
        await asyncio.open_connection(
            HOST,
            target.port,
            ssl=target.client_ssl,
            server_hostname=SERVER_NAME,
            ssl_handshake_timeout=target.wait_s,
        )
    )


async def upgrade(
    target: Target, path: str, token: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await open_tls(target)
    writer.write(upgrade_request(path, token))
    await writer.drain()
    return reader, writer, await read_head(reader)


async def until_closed(reader: asyncio.StreamReader, limit_s: float) -> bool:
    """Read until the peer closes; False if it did not within ``limit_s``."""
    try:
        async with asyncio.timeout(limit_s):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


async def until_ws_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit_s: float
) -> int | None:
    """Read server frames until the TCP close, answering its close frame (RFC 6455 5.5.1) as
    a client must; the close code it sent, or None if it did not close within ``limit_s``."""
    code: int | None = 1005
    try:
        async with asyncio.timeout(limit_s):
            while True:
                opcode, payload = await read_frame(reader)
                if opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    writer.write(close_frame(code if code not in {1005, 1006} else 1000))
                    await writer.drain()
                    await until_closed(reader, limit_s)
                    return code
                if opcode == 0x9:  # ping: pong
                    writer.write(ws_frame(payload, opcode=0xA))
    except TimeoutError:
        return None
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        return code


async def server_closes(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target, failure: str
) -> None:
    """Assert that the server ends the connection within ``target.wait_s``; then close ours."""
    assert await until_closed(reader, target.wait_s), failure
    cut(writer, "close")
    await closed(writer)


def cut(writer: asyncio.StreamWriter, how: str) -> None:
    """End a connection: ``abort`` (no TLS close, RST-like) or ``close`` (close_notify, FIN)."""
    if how == "abort":
        writer.transport.abort()
    else:
        writer.close()


async def closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
        await writer.wait_closed()


def stream_messages(sid: str, frames: int, *, stop: bool) -> tuple[list[str], NDArray[np.int16]]:
    """connected, start, ``frames`` 20 ms μ-law frames (and stop); the samples they carry."""
    samples = ((np.arange(frames * 160) * 37) % 16000 - 8000).astype(np.int16)
    encoded = PCMU.encode(samples)
    messages = build_messages(codec=PCMU, tracks={"inbound": encoded}, stream_sid=sid, stop=stop)
    return messages, PCMU.decode(encoded)


# Each kind of client returns a short outcome label; it raises only on a wrong answer from the
# server (a failed assertion), and is bounded by Target.wait_s.
Kind = Callable[[Target, random.Random, str], Awaitable[str]]


async def tcp_close(target: Target, rng: random.Random, sid: str) -> str:
    """TCP connect, then close at once (mid-handshake: nothing sent)."""
    _, writer = await open_tcp(target)
    cut(writer, "close")
    await closed(writer)
    return "closed"


async def tcp_reset(target: Target, rng: random.Random, sid: str) -> str:
    """TCP connect, then reset (SO_LINGER 0)."""
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (HOST, target.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    return "reset"


async def hello_partial(target: Target, rng: random.Random, sid: str) -> str:
    """A ClientHello cut short, then close or reset."""
    hello = client_hello(target.client_ssl)
    _reader, writer = await open_tcp(target)
    writer.write(hello[: rng.randint(1, len(hello) - 1)])
    await writer.drain()
    if rng.random() < 0.5:
        await asyncio.sleep(rng.random() * 0.05)
    cut(writer, rng.choice(["abort", "close"]))
    await closed(writer)
    return "cut"


async def tls_mid(target: Target, rng: random.Random, sid: str) -> str:
    """A whole ClientHello, part of the server's answer read, then cut mid-handshake."""
    reader, writer = await open_tcp(target)
    writer.write(client_hello(target.client_ssl))
    await writer.drain()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(target.wait_s):
            await reader.read(rng.randint(1, 4000))
    cut(writer, rng.choice(["abort", "close"]))
    await closed(writer)
    return "cut"


async def tls_garbage(target: Target, rng: random.Random, sid: str) -> str:
    """Random bytes where TLS is expected (sometimes behind a TLS record header)."""
    junk = rng.randbytes(rng.randint(1, 3000))
    if rng.random() < 0.5:
        junk = b"\x16\x03\x01" + struct.pack("!H", len(junk)) + junk
    reader, writer = await open_tcp(target)
    writer.write(junk)
    await writer.drain()
    await server_closes(reader, writer, target, "server kept a garbage TLS connection")
    return "refused"


async def plain_http(target: Target, rng: random.Random, sid: str) -> str:
    """Plain ws:// (HTTP in the clear) to the TLS port."""
    reader, writer = await open_tcp(target)
    writer.write(upgrade_request("/plain", target.token))
    await writer.drain()
    await server_closes(reader, writer, target, "server kept a plaintext connection")
    return "refused"


async def idle_tcp(target: Target, rng: random.Random, sid: str) -> str:
    """TCP connect and say nothing: the TLS handshake timeout must close it."""
    reader, writer = await open_tcp(target)
    await server_closes(reader, writer, target, "idle TCP connection never closed")
    return "timed-out"


async def idle_tls(target: Target, rng: random.Random, sid: str) -> str:
    """TLS done, no HTTP request: the handshake timeout must close it."""
    reader, writer = await open_tls(target)
    await server_closes(reader, writer, target, "idle TLS connection never closed")
    return "timed-out"


async def http_partial(target: Target, rng: random.Random, sid: str) -> str:
    """TLS done, half an upgrade request, then cut (or wait for the timeout)."""
    reader, writer = await open_tls(target)
    request = upgrade_request(f"/soak/{sid}", target.token)
    writer.write(request[: rng.randint(1, len(request) - 1)])
    await writer.drain()
    if rng.random() < 0.3:
        assert await until_closed(reader, target.wait_s), "half request never timed out"
        outcome = "timed-out"
    else:
        outcome = "cut"
    cut(writer, rng.choice(["abort", "close"]))
    await closed(writer)
    return outcome


async def http_garbage(target: Target, rng: random.Random, sid: str) -> str:
    """TLS done, then bytes that are not HTTP: refused (400 or closed)."""
    reader, writer = await open_tls(target)
    writer.write(rng.randbytes(rng.randint(1, 2000)) + b"\r\n\r\n")
    await writer.drain()
    await server_closes(reader, writer, target, "server kept an HTTP garbage connection")
    return "refused"


async def wrong_token(target: Target, rng: random.Random, sid: str) -> str:
    """A wrong, missing or query-string token: 401, nothing recorded."""
    token = rng.choice([None, "wrong-token-0123456789abcdef", target.token + "x"])
    path = f"/soak/{sid}" + (f"?token={target.token}" if token is None else "")
    _reader, writer, status = await upgrade(target, path, token)
    assert status == 401, status
    cut(writer, "close")
    await closed(writer)
    return "401"


async def idle_upgraded(target: Target, rng: random.Random, sid: str) -> str:
    """Upgraded, then silence: the idle timeout must close it (before or after start)."""
    reader, writer, status = await upgrade(target, f"/soak/{sid}", target.token)
    assert status == 101, status
    if rng.random() < 0.5:
        messages, _ = stream_messages(sid, 2, stop=False)
        for message in messages:
            writer.write(ws_frame(message.encode()))
        await writer.drain()
    code = await until_ws_closed(reader, writer, target.wait_s)
    assert code == 1008, f"idle stream: {code}"
    cut(writer, "close")
    await closed(writer)
    return "timed-out"


async def half_frame(target: Target, rng: random.Random, sid: str) -> str:
    """Upgraded (maybe a few frames of a stream), then half a WebSocket frame, then cut."""
    _reader, writer, status = await upgrade(target, f"/soak/{sid}", target.token)
    assert status == 101, status
    messages, _ = stream_messages(sid, rng.randint(0, 5), stop=False)
    for message in messages[: rng.randint(0, len(messages))]:
        writer.write(ws_frame(message.encode()))
    last = ws_frame(rng.choice(messages or ['{"event": "connected"}']).encode())
    writer.write(last[: rng.randint(1, len(last) - 1)])
    await writer.drain()
    cut(writer, rng.choice(["abort", "close"]))
    await closed(writer)
    return "cut"


async def cut_stream(target: Target, rng: random.Random, sid: str) -> str:
    """A valid stream cut after a few media frames: reset, TCP close, or close frame."""
    reader, writer, status = await upgrade(target, f"/soak/{sid}", target.token)
    assert status == 101, status
    messages, _ = stream_messages(sid, rng.randint(1, 12), stop=False)
    for message in messages:
        writer.write(ws_frame(message.encode()))
    how = rng.choice(["abort", "close", "close-frame"])
    if how == "close-frame":
        writer.write(close_frame(1000))
        await writer.drain()
        assert await until_ws_closed(reader, writer, target.wait_s), "close never answered"
    else:
        await writer.drain()
    cut(writer, "close" if how == "close-frame" else how)
    await closed(writer)
    return how


async def bad_message(target: Target, rng: random.Random, sid: str) -> str:
    """A valid start, then a frame that breaks the protocol: the server closes it."""
    reader, writer, status = await upgrade(target, f"/soak/{sid}", target.token)
    assert status == 101, status
    messages, _ = stream_messages(sid, 2, stop=False)
    bad = rng.choice([b"{not json", b'{"event": "start"}', b"[1, 2]"])
    for message in [*(m.encode() for m in messages), bad]:
        writer.write(ws_frame(message))
    if rng.random() < 0.3:
        writer.write(ws_frame(b"\x00\x01", opcode=0x2))  # binary frame
    await writer.drain()
    code = await until_ws_closed(reader, writer, target.wait_s)
    assert code in {1003, 1007}, f"bad stream: {code}"
    cut(writer, "close")
    await closed(writer)
    return "closed-by-server"


async def full_stream(target: Target, rng: random.Random, sid: str) -> str:
    """A whole valid stream with stop, as the platform sends it: closed with 1000."""
    reader, writer, status = await upgrade(target, f"/soak/{sid}", target.token)
    assert status == 101, status
    messages, _ = stream_messages(sid, rng.randint(1, 25), stop=True)
    for message in messages:
        writer.write(ws_frame(message.encode()))
    await writer.drain()
    code = await until_ws_closed(reader, writer, target.wait_s)
    assert code == 1000, f"stopped stream: {code}"
    cut(writer, "close")
    await closed(writer)
    return "stopped"


KINDS: dict[str, Kind] = {
    "tcp-close": tcp_close,
    "tcp-reset": tcp_reset,
    "hello-partial": hello_partial,
    "tls-mid": tls_mid,
    "tls-garbage": tls_garbage,
    "plain-http": plain_http,
    "idle-tcp": idle_tcp,
    "idle-tls": idle_tls,
    "http-partial": http_partial,
    "http-garbage": http_garbage,
    "wrong-token": wrong_token,
    "idle-upgraded": idle_upgraded,
    "half-frame": half_frame,
    "cut-stream": cut_stream,
    "bad-message": bad_message,
    "full-stream": full_stream,
}
# Kinds that may get as far as a start, after which the server records the stream.
RECORDING_KINDS = {"idle-upgraded", "half-frame", "cut-stream", "bad-message", "full-stream"}


@dataclass
class ChaosResult:
    """How many connections of each kind ran, how they ended, and how long it all took."""

    outcomes: Counter[str]
    kinds: Counter[str]
    seconds: float
    errors: list[str]


async def chaos(
    target: Target,
    *,
    connections: int,
    concurrency: int,
    seed: int,
    sid_prefix: str,
    limit_s: float,
) -> ChaosResult:
    """Open ``connections`` connections of random kinds, ``concurrency`` at a time."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible plan, not a secret
    plan = [(i, rng.choice(sorted(KINDS)), rng.randrange(2**32)) for i in range(connections)]
    gate = asyncio.Semaphore(concurrency)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    errors: list[str] = []

    async def one(i: int, kind: str, kind_seed: int) -> None:
        async with gate:
            sid = f"{sid_prefix}-{i}-{kind}"
            kinds[kind] += 1
            try:
                with owned_connections():
                    async with asyncio.timeout(target.wait_s + 5):
                        outcome = await KINDS[kind](target, random.Random(kind_seed), sid)  # noqa: S311
                outcomes[f"{kind}: {outcome}"] += 1
            except (AssertionError, TimeoutError) as exc:
                errors.append(f"{sid}: {type(exc).__name__}: {exc}")
            except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
                # The server may close first at any of these stages; that is its right.
                outcomes[f"{kind}: closed by server ({type(exc).__name__})"] += 1

    started = time.monotonic()
    async with asyncio.timeout(limit_s):
        await asyncio.gather(*(one(*p) for p in plan))
    return ChaosResult(outcomes, kinds, time.monotonic() - started, errors)


# ---------------------------------------------------------------------------------------------
# Whole streams and what they leave


async def good_stream(target: Target, sid: str, frames: int = 50) -> NDArray[np.int16]:
    """Play a whole stream with the simulator's client; the samples that must be recorded."""
    from receiver.simulate import play

    messages, expected = stream_messages(sid, frames, stop=True)
    result = await play(
        f"wss://{SERVER_NAME}:{target.port}/soak/good",
        messages,
        token=target.token,
        ssl_context=target.client_ssl,
    )
    assert result.close_code == 1000, result
    return expected


def check_recordings(root: Path) -> Counter[str]:
    """Every stream.json finished, no in-progress marker left, nothing recorded for a client
    that never got past the handshake (wrong token, TLS or HTTP garbage); counts by end kind."""
    ends: Counter[str] = Counter()
    unfinished = []
    allowed = (*(f"-{kind}" for kind in RECORDING_KINDS), "-good")
    strays = [
        d.name
        for d in root.iterdir()
        if d.is_dir() and d.name != ".in-progress" and not d.name.endswith(allowed)
    ]
    assert not strays, f"recorded for a client that never started a stream: {strays[:10]}"
    for record_path in root.glob("*/stream.json"):
        record = json.loads(record_path.read_text())
        if record.get("status") != "complete":
            unfinished.append(record_path.parent.name)
        ends[record.get("end", {}).get("kind", "?")] += 1
    assert not unfinished, f"streams never finished: {unfinished[:10]}"
    markers = root / ".in-progress"
    left = list(markers.iterdir()) if markers.is_dir() else []
    assert not left, f"in-progress markers left: {left[:10]}"
    return ends


def target(server: ServerProcess, client_ssl: ssl.SSLContext) -> Target:
    return Target(server.port, client_ssl, TOKEN, handshake_timeout_s=10, idle_timeout_s=60)


# ---------------------------------------------------------------------------------------------
# Raw attackers


async def open_from(
    port: int,
    source_ip: str,
    *,
    client_ssl: ssl.SSLContext | None,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP (or TLS) connection to the server from ``source_ip`` (a loopback address)."""
    return await asyncio.open_connection(
        HOST,
        port,
        ssl=client_ssl,
        server_hostname=SERVER_NAME if client_ssl else None,
        local_addr=(source_ip, 0),
        limit=limit,
        ssl_handshake_timeout=30 if client_ssl else None,
    )


async def open_stream(
    port: int,
    client_ssl: ssl.SSLContext,
    sid: str,
    *,
    source_ip: str = ATTACKER_IPS[0],
    rate_hz: int = 8000,
    tracks: int = 1,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An upgraded stream with ``connected`` and ``start`` sent (L16, inbound [and outbound])."""
    reader, writer = await open_from(port, source_ip, client_ssl=client_ssl, limit=limit)
    try:
        writer.write(upgrade_request(f"/chaos/{sid}", TOKEN))
        status, head = await read_status(reader)
    except BaseException:
        abort(writer)
        raise
    if status != 101:
        abort(writer)
        raise AssertionError(head)
    writer.write(ws_frame(b'{"event": "connected", "protocol": "Call"}'))
    names = ["inbound", "outbound"][:tracks]
    writer.write(ws_frame(json.dumps(start_event(sid, rate_hz, names)).encode()))
    await writer.drain()
    return reader, writer


async def read_frames(
    reader: asyncio.StreamReader, on_frame: Callable[[int, bytes], Awaitable[None] | None]
) -> None:
    """Read server frames (unmasked) until EOF, calling ``on_frame(opcode, payload)``."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        while True:
            opcode, payload = await read_frame(reader)
            result = on_frame(opcode, payload)
            if result is not None:
                await result


def abort(writer: asyncio.StreamWriter) -> None:
    if not writer.transport.is_closing():
        writer.transport.abort()
