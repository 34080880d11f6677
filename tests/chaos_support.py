"""Chaos helpers: a `receiver serve` subprocess (uvloop, TLS) under one attack at a time, a paced
known-good stream beside it that also measures the server's ping round trip, and the figures
before and after (RSS after a full gc, fds, the attack's counter and log line).

The good stream runs in a process of its own (``python -m tests.chaos_support probe``), so
that an attacker busy in the test's process (its TLS handshakes, its floods) delays neither its
frames nor its pongs: the round trips it measures are the server's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from receiver import tls
from tests.conftest import TOKEN, TlsFiles, read_wav
from tests.soak_helpers import (
    HOST,
    SERVER_NAME,
    ProcFigures,
    ServerProcess,
    Target,
    good_stream,
    http_get,
    log_problems,
    proc_figures,
    upgrade_request,
    wait_until,
)

RATE_HZ = 16_000  # the good stream: L16 16 kHz, both tracks, 20 ms frames
FRAME_SAMPLES = RATE_HZ // 50
PING_EVERY_S = 0.05
# Attackers connect from other loopback addresses than the good stream and the checks
# (127.0.0.1), so that per-address limits keep them apart as they would on the internet.
ATTACKER_IPS = tuple(f"127.0.0.{n}" for n in range(2, 40))


# ---------------------------------------------------------------------------------------------
# The server


# The server and the good stream run at a higher CPU priority than the attackers (when allowed:
# root), so that other load on the machine does not pass for a freeze of the server's loop.
PRIORITY = -10


def raise_priority() -> None:
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)


def server_preexec(nofile: int | None) -> Callable[[], None]:
    """A preexec_fn for the server: a higher priority, and RLIMIT_NOFILE ``nofile`` (soft and
    hard) when given."""

    def apply() -> None:
        raise_priority()
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return apply


@contextlib.contextmanager
def chaos_server(
    root: Path,
    tls_files: TlsFiles,
    *,
    nofile: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """`receiver serve` on uvloop with the test certificate and token, recordings under root."""
    recordings = root / "recordings"
    recordings.mkdir(exist_ok=True)
    values = {
        "RECEIVER_TOKENS": TOKEN,
        "RECEIVER_TLS_CERT": str(tls_files.cert),
        "RECEIVER_TLS_KEY": str(tls_files.key),
        "RECEIVER_RECORDINGS_DIR": str(recordings),
        "RECEIVER_EVENT_LOOP": "uvloop",
        "RECEIVER_DRAIN_TIMEOUT_S": "1",
        # The web page's fixed port (8080) would collide with any other receiver running here;
        # it is not what these attacks aim at.
        "RECEIVER_UI_PORT": "",
        **(env or {}),
    }
    server = ServerProcess(root, values, preexec_fn=server_preexec(nofile))
    try:
        server.wait_listening()
        yield server
    finally:
        server.stop()


def target(server: ServerProcess, client_ssl: ssl.SSLContext) -> Target:
    return Target(server.port, client_ssl, TOKEN, handshake_timeout_s=10, idle_timeout_s=60)


def metric_total(body: str, name: str, **labels: str) -> float:
    """The sum of every sample whose name matches the regular expression ``name`` (with or
    without ``_total``; any labels, or those given); 0 when absent."""
    total = 0.0
    pattern = re.compile(rf"^(?:{name})(?:_total)?(\{{[^}}]*\}})? (\S+)$")
    for line in body.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def metric_names(body: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line[:1].isalpha()}


# ---------------------------------------------------------------------------------------------
# The paced good stream and its ping probe


def good_audio(seed: int, seconds: float) -> dict[str, NDArray[np.int16]]:
    """Known audio for both tracks: seeded full-scale noise, so any lost or moved sample shows."""
    rng = np.random.default_rng(seed)
    samples = int(seconds * RATE_HZ) // FRAME_SAMPLES * FRAME_SAMPLES
    return {
        track: rng.integers(-32768, 32767, samples, dtype=np.int16, endpoint=True)
        for track in ("inbound", "outbound")
    }


@dataclass
class ProbeResult:
    """What the good stream sent and saw."""

    sid: str
    sent: dict[str, NDArray[np.int16]]
    rtts_s: list[tuple[float, float]]  # (when sent, CLOCK_MONOTONIC; round trip)
    close_code: int | None
    rss_peak_kib: int
    error: str | None = None

    @property
    def max_rtt_ms(self) -> float:
        return round(1000 * max((rtt for _, rtt in self.rtts_s), default=float("inf")), 1)

    def worst_ping_at(self) -> float:
        """When the slowest ping was sent (CLOCK_MONOTONIC, the same in every process)."""
        return max(self.rtts_s, key=lambda p: p[1], default=(float("nan"), 0.0))[0]


MAX_GOOD_SECONDS = 600.0


class GoodStream:
    """The paced good stream (``PacedStream``) in a subprocess: ``start()`` returns once it
    streams, ``stop()`` has it send ``stop`` and hands back what it sent and measured."""

    def __init__(self, *, port: int, cert: Path, server_pid: int, sid: str) -> None:
        self.sid = sid
        root = Path(__file__).resolve().parent.parent
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.chaos_support",
                "probe",
                *map(str, (port, cert)),
                str(server_pid),
                sid,
            ],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def start(self) -> None:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # "started", or the result of a failed start
        if line.strip() != "started":
            self._proc.kill()
            raise AssertionError(f"the good stream did not start: {line.strip()}")

    async def stop(self) -> ProbeResult:
        """Send ``stop``, wait for the server's close, and hand back what was sent and seen."""
        out, _ = await asyncio.to_thread(self._proc.communicate, "stop\n", 120)
        result = json.loads(out.strip().splitlines()[-1])
        frames = result.pop("frames")
        audio = good_audio(zlib.crc32(self.sid.encode()), MAX_GOOD_SECONDS)
        sent = {t: a[: frames * FRAME_SAMPLES] for t, a in audio.items()}
        return ProbeResult(sent=sent, **result)


@dataclass
class PacedStream:
    """A real WebSocket client over TLS sending one frame per track every 20 ms until stopped,
    pinging the server every 50 ms (run by ``GoodStream`` in a process of its own)."""

    port: int
    client_ssl: ssl.SSLContext
    server_pid: int
    sid: str = "good"
    max_seconds: float = MAX_GOOD_SECONDS
    _started: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _result: ProbeResult | None = None
    frames: int = 0

    async def _main(self) -> None:
        audio = good_audio(zlib.crc32(self.sid.encode()), self.max_seconds)
        rtts: list[tuple[float, float]] = []
        pending: dict[int, float] = {}
        rss_peak = 0
        frames = 0
        error = None
        close_code = None
        try:
            async with connect(
                f"wss://{SERVER_NAME}:{self.port}/chaos/{self.sid}",
                ssl=self.client_ssl,
                additional_headers={"Authorization": f"Bearer {TOKEN}"},
                ping_interval=None,
                max_queue=None,
                open_timeout=30,
                close_timeout=30,
            ) as ws:
                await ws.send(json.dumps({"event": "connected", "protocol": "Call"}))
                await ws.send(json.dumps(start_event(self.sid, RATE_HZ, ["inbound", "outbound"])))

                async def pinger() -> None:
                    n = 0
                    while True:
                        n += 1
                        sent_at = time.monotonic()
                        pending[n] = sent_at
                        waiter = asyncio.ensure_future(await ws.ping(struct.pack("!I", n)))

                        def done(_: Any, n: int = n, sent_at: float = sent_at) -> None:
                            rtts.append((sent_at, time.monotonic() - sent_at))
                            pending.pop(n, None)

                        waiter.add_done_callback(done)
                        await asyncio.sleep(PING_EVERY_S)

                async def rss() -> None:
                    nonlocal rss_peak
                    while True:
                        rss_peak = max(rss_peak, proc_figures(self.server_pid).rss_kib)
                        await asyncio.sleep(0.1)

                async def drain_incoming() -> None:
                    async for _ in ws:
                        pass

                tasks = [asyncio.create_task(c()) for c in (pinger, rss, drain_incoming)]
                t0 = time.monotonic()
                seq = 2
                self._started.set()
                limit = len(audio["inbound"]) // FRAME_SAMPLES
                while not self._stop.is_set() and frames < limit:
                    due = t0 + frames * 0.02
                    now = time.monotonic()
                    if due > now:
                        await asyncio.sleep(due - now)
                    for track in ("inbound", "outbound"):
                        chunk = audio[track][frames * FRAME_SAMPLES : (frames + 1) * FRAME_SAMPLES]
                        seq += 1
                        await ws.send(media_event(seq, track, frames, chunk.tobytes()))
                    frames += 1
                await ws.send(json.dumps({"event": "stop", "sequenceNumber": str(seq + 1)}))
                await asyncio.wait_for(tasks[2], 60)  # until the server's close
                for task in tasks[:2]:
                    task.cancel()
                close_code = ws.close_code
        except (OSError, ConnectionClosed, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        rtts.extend((t, now - t) for t in pending.values())  # never answered: all we waited
        sent = {t: a[: frames * FRAME_SAMPLES] for t, a in audio.items()}
        self.frames = frames
        self._result = ProbeResult(self.sid, sent, rtts, close_code, rss_peak, error)
        self._started.set()


def probe_main(port: int, cert: Path, server_pid: int, sid: str) -> None:
    """The good stream's process: "started" once it streams, its result as JSON at the end."""
    raise_priority()
    stream = PacedStream(port, tls.client_context(cert), server_pid, sid=sid)

    def announce() -> None:
        stream._started.wait()
        if stream._result is None:
            print("started", flush=True)
        sys.stdin.readline()  # "stop", or EOF when the test is gone
        stream._stop.set()

    threading.Thread(target=announce, daemon=True).start()
    asyncio.run(stream._main())
    result = stream._result
    assert result is not None
    fields = {
        "sid": result.sid,
        "frames": stream.frames,
        "rtts_s": result.rtts_s,
        "close_code": result.close_code,
        "rss_peak_kib": result.rss_peak_kib,
        "error": result.error,
    }
    print(json.dumps(fields), flush=True)


def start_event(sid: str, rate_hz: int, tracks: list[str]) -> dict[str, Any]:
    return {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "streamSid": sid,
            "accountSid": "chaos-account",
            "callSid": "chaos-call",
            "tracks": tracks,
            "mediaFormat": {"encoding": "audio/x-L16", "sampleRate": rate_hz, "channels": 1},
        },
    }


def media_event(
    seq: int,
    track: str,
    frame: int,
    pcm: bytes,
    *,
    timestamp: bool = True,
    chunk: int | None = None,
) -> str:
    media: dict[str, str] = {"track": track, "chunk": str(frame + 1 if chunk is None else chunk)}
    if timestamp:
        media["timestamp"] = str(frame * 20)
    media["payload"] = base64.b64encode(pcm).decode()
    return json.dumps({"event": "media", "sequenceNumber": str(seq), "media": media})


def check_good_stream(recordings: Path, result: ProbeResult) -> None:
    """The good stream closed 1000 and each of its WAVs equals what was sent, sample by sample."""
    assert result.error is None, result.error
    assert result.close_code == 1000, result.close_code
    for track, sent in result.sent.items():
        samples, rate = read_wav(recordings / result.sid / f"{track}.wav")
        assert rate == RATE_HZ
        assert len(sent) > 0
        np.testing.assert_array_equal(samples, sent, err_msg=f"good stream, {track}")


# ---------------------------------------------------------------------------------------------
# Raw attackers


def frame(payload: bytes, *, opcode: int = 0x1) -> bytes:
    """A client frame with an all-zero mask (RFC 6455 allows any key): built fast, in bulk."""
    length = len(payload)
    head = bytes([0x80 | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    return head + b"\0\0\0\0" + payload


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


async def read_status(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


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
    writer.write(frame(b'{"event": "connected", "protocol": "Call"}'))
    names = ["inbound", "outbound"][:tracks]
    writer.write(frame(json.dumps(start_event(sid, rate_hz, names)).encode()))
    await writer.drain()
    return reader, writer


async def read_frames(
    reader: asyncio.StreamReader, on_frame: Callable[[int, bytes], Awaitable[None] | None]
) -> None:
    """Read server frames (unmasked) until EOF, calling ``on_frame(opcode, payload)``."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        while True:
            head = await reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(length)
            result = on_frame(head[0] & 0x0F, payload)
            if result is not None:
                await result


def abort(writer: asyncio.StreamWriter) -> None:
    if not writer.transport.is_closing():
        writer.transport.abort()


def record_of(recordings: Path, sid: str) -> dict[str, Any]:
    return dict(json.loads((recordings / sid / "stream.json").read_text()))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# One attack, measured


@dataclass
class Measured:
    """The figures of one attack: the before/after table's row."""

    attack: str
    before: ProcFigures
    after: ProcFigures
    rss_peak_kib: int
    max_rtt_ms: float
    pings: int
    metrics: str
    log: str
    figures: dict[str, Any]
    attack_s: float  # how long the attack ran
    worst_ping_at_s: float  # when the slowest ping left, from the attack's start

    def row(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "max_ping_rtt_ms": self.max_rtt_ms,
            "worst_ping_at_s": self.worst_ping_at_s,
            "attack_s": self.attack_s,
            "pings": self.pings,
            "rss_before_kib": self.before.rss_kib,
            "rss_peak_kib": self.rss_peak_kib,
            "rss_after_gc_kib": self.after.rss_kib,
            "fds_before": self.before.fds,
            "fds_after": self.after.fds,
            **self.figures,
        }

    def log_problems(self) -> list[str]:
        return log_problems(self.log)


async def settle_fds(server: ServerProcess, fds: int, limit_s: float = 15.0) -> None:
    """Wait (bounded) until the server holds no more descriptors than ``fds``."""
    await wait_until(lambda: server.figures().fds <= fds, limit_s)


async def measure(
    name: str,
    server: ServerProcess,
    client_ssl: ssl.SSLContext,
    attack: Callable[[], Awaitable[dict[str, Any]]],
    *,
    cert: Path,
    settle_s: float = 15.0,
) -> tuple[Measured, ProbeResult]:
    """Warm up, take the baseline (after a full gc), run ``attack`` beside a paced good stream,
    then let the server settle and take the figures again (after a full gc)."""
    goal = target(server, client_ssl)
    assert (await http_get(goal, "/healthz"))[0] == 200
    good = GoodStream(port=server.port, cert=cert, server_pid=server.pid, sid=f"good-{name}")
    await good_stream(goal, "warm-up", frames=25)  # every lazy set-up done before the baseline
    await http_get(goal, "/metrics")
    await asyncio.sleep(0.2)
    await server.collect_garbage()
    before = server.figures()
    good.start()
    await asyncio.sleep(0.3)
    attack_started = time.monotonic()
    figures = await attack()
    attack_s = time.monotonic() - attack_started
    await asyncio.sleep(0.3)
    probe = await good.stop()
    await settle_fds(server, before.fds, settle_s)
    await asyncio.sleep(0.3)
    await server.collect_garbage()
    after = server.figures()
    status, metrics = await http_get(goal, "/metrics")
    assert status == 200
    measured = Measured(
        attack=name,
        before=before,
        after=after,
        rss_peak_kib=probe.rss_peak_kib,
        max_rtt_ms=probe.max_rtt_ms,
        pings=len(probe.rtts_s),
        metrics=metrics,
        log=server.log.read_text(),
        figures=figures,
        attack_s=round(attack_s, 2),
        worst_ping_at_s=round(probe.worst_ping_at() - attack_started, 2),
    )
    return measured, probe


def save_row(path: str | None, row: dict[str, Any]) -> None:
    """Print one attack's figures; add them to the JSON report at ``path`` (scripts/chaos)."""
    print(json.dumps(row, default=str))
    if path:
        report = Path(path)
        rows = json.loads(report.read_text()) if report.exists() and report.stat().st_size else []
        rows = [r for r in rows if r.get("attack") != row["attack"]] + [row]
        report.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    assert sys.argv[1] == "probe", sys.argv
    probe_main(int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
