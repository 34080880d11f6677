"""Soak helpers: a `receiver serve` subprocess measured through /proc, and clients that open
connections and cut them at every stage (TCP, TLS, HTTP upgrade, mid-frame, mid-stream).

Every client is bounded in time and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from websockets.frames import Frame, Opcode

from receiver.codecs import CLI_CODECS, codec_for
from receiver.simulate import build_messages

PCMU = codec_for(CLI_CODECS["pcmu"])
HOST = "127.0.0.1"
SERVER_NAME = "localhost"  # the name in the test certificate

# ---------------------------------------------------------------------------------------------
# Measuring a process through /proc


@dataclass(frozen=True)
class ProcFigures:
    """What a process holds: file descriptors by kind, resident memory, threads."""

    fds: int
    open_files: int  # regular files (WAVs, stream.json, logs)
    sockets: int
    rss_kib: int
    threads: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def fd_targets(pid: int | str = "self") -> list[str]:
    """Where each open descriptor of ``pid`` points (``socket:[…]``, a path, ``pipe:[…]``)."""
    root = Path(f"/proc/{pid}/fd")
    targets = []
    for entry in root.iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            targets.append(os.readlink(entry))
    return targets


def proc_figures(pid: int | str = "self") -> ProcFigures:
    """fds, regular files, sockets (from /proc/<pid>/fd), VmRSS and Threads (status)."""
    targets = fd_targets(pid)
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return ProcFigures(
        fds=len(targets),
        open_files=sum(1 for t in targets if t.startswith("/") and not t.startswith("/dev/")),
        sockets=sum(1 for t in targets if t.startswith("socket:")),
        rss_kib=int(status["VmRSS"].split()[0]),
        threads=int(status["Threads"].strip()),
    )


# ---------------------------------------------------------------------------------------------
# The receiver in a subprocess


# Test instrumentation put into the server process (a sitecustomize on its PYTHONPATH; the
# receiver is not changed): SIGUSR2 runs a full garbage collection and appends how many objects
# it freed to $SOAK_GC_ACK. It tells memory that is still referenced (a leak) from garbage in
# reference cycles waiting for the collector: CPython before 3.11.8 / 3.12.2 keeps every
# asyncio SSLProtocol whose TLS handshake failed, with its 256 KiB read buffer, in such a
# cycle (python/cpython#109534), which a full collection frees.
GC_HOOK = """\
import gc, os, signal

def _collect(signum, frame):
    freed = gc.collect()
    with open(os.environ["SOAK_GC_ACK"], "a") as ack:
        ack.write(f"{freed}\\n")

signal.signal(signal.SIGUSR2, _collect)
"""


class ServerProcess:
    """`python -m receiver serve` on 127.0.0.1 and a free port, its log in a file."""

    def __init__(
        self, cwd: Path, env: dict[str, str], *, preexec_fn: Callable[[], None] | None = None
    ) -> None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = int(s.getsockname()[1])
        self.log = cwd / "serve.log"
        hook = cwd / "gc-hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(GC_HOOK)
        self.gc_ack = cwd / "gc-ack"
        self.gc_ack.write_text("")
        base = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
        base["RECEIVER_UI_PORT"] = ""  # the web page is off: its port is not this test's
        base.update(env)
        base.update(RECEIVER_HOST=HOST, RECEIVER_PORT=str(self.port))
        base["PYTHONPATH"] = os.pathsep.join(
            [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        base["SOAK_GC_ACK"] = str(self.gc_ack)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "receiver", "serve"],
                cwd=cwd,
                env=base,
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=preexec_fn,  # only setrlimit (tests/chaos_support.py)
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_listening(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "listening on" in self.log.read_text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"receiver exited: {self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"receiver not listening after {timeout_s} s: {self.log.read_text()}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit within 30 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=30)

    def figures(self) -> ProcFigures:
        return proc_figures(self.pid)

    async def collect_garbage(self) -> int:
        """Have the server run a full garbage collection; how many objects it freed."""
        done = len(self.gc_ack.read_text().splitlines())
        self.proc.send_signal(signal.SIGUSR2)
        assert await wait_until(lambda: len(self.gc_ack.read_text().splitlines()) > done, 10), (
            "the server did not run its garbage collection"
        )
        return int(self.gc_ack.read_text().splitlines()[-1])


@contextlib.contextmanager
def server_process(cwd: Path, env: dict[str, str]) -> Iterator[ServerProcess]:
    """A listening receiver subprocess, always stopped (killed if need be) afterwards."""
    server = ServerProcess(cwd, env)
    try:
        server.wait_listening()
        yield server
    finally:
        server.stop()


def log_problems(text: str) -> list[str]:
    """Log lines that mean something went wrong inside the server (not a client's fault)."""
    marks = ("Traceback", "internal error", "connection handler failed", "Exception in callback")
    marks += ("Task was destroyed", "never retrieved", "Unclosed", "ResourceWarning")
    return [line for line in text.splitlines() if any(m in line for m in marks)]


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


def ws_frame(payload: bytes, *, opcode: int = 0x1, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 section 5.2), framed by websockets."""
    return Frame(Opcode(opcode), payload, fin=fin).serialize(mask=True)


def close_frame(code: int = 1000) -> bytes:
    return ws_frame(struct.pack("!H", code), opcode=0x8)


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


def upgrade_request(path: str, token: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {SERVER_NAME}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_head(reader: asyncio.StreamReader) -> int:
    """The status code of an HTTP response head."""
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1])


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
                head = await reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", await reader.readexactly(8))[0]
                payload = await reader.readexactly(length)
                opcode = head[0] & 0x0F
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
# Health checks


async def http_get(target: Target, path: str) -> tuple[int, str]:
    """GET over TLS without a token: status and body."""
    with owned_connections():
        reader, writer = await open_tls(target)
        request = f"GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
        cut(writer, "close")
        await closed(writer)
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def metric(body: str, name: str) -> float | None:
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


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


async def wait_until(predicate: Callable[[], bool], limit_s: float) -> bool:
    """Poll ``predicate`` every 50 ms for at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def report(path: str | None, name: str, figures: dict[str, Any]) -> None:
    """Print one soak's figures, and add them under ``name`` to the JSON file ``path``."""
    print(json.dumps({name: figures}, indent=2, default=str))
    if path:
        target = Path(path)
        merged = json.loads(target.read_text()) if target.exists() and target.stat().st_size else {}
        merged[name] = figures
        target.write_text(json.dumps(merged, indent=2, default=str))
