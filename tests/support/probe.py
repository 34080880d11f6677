"""The chaos tests' paced known-good stream, which also measures the server's ping round trip.

It runs in a process of its own (``python -m tests.support.probe``), so that an attacker busy
in the test's process (its TLS handshakes, its floods) delays neither its frames nor its pongs:
the round trips it measures are the server's.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from receiver import tls
from tests.support.audio import read_wav
from tests.support.receiver import TOKEN
from tests.support.server_process import proc_figures, raise_priority
from tests.support.wire import SERVER_NAME, media_event, start_event

RATE_HZ = 16_000  # the good stream: L16 16 kHz, both tracks, 20 ms frames
FRAME_SAMPLES = RATE_HZ // 50
PING_EVERY_S = 0.05


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
        root = Path(__file__).resolve().parents[2]
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.probe",
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


def check_good_stream(recordings: Path, result: ProbeResult) -> None:
    """The good stream closed 1000 and each of its WAVs equals what was sent, sample by sample."""
    assert result.error is None, result.error
    assert result.close_code == 1000, result.close_code
    for track, sent in result.sent.items():
        samples, rate = read_wav(recordings / result.sid / f"{track}.wav")
        assert rate == RATE_HZ
        assert len(sent) > 0
        np.testing.assert_array_equal(samples, sent, err_msg=f"good stream, {track}")


if __name__ == "__main__":
    assert sys.argv[1] == "probe", sys.argv
    probe_main(int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
