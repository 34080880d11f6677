"""Benchmarks of the receiver, each printing ratios measured in one run.

    python -m bench.run overhead [--rounds 5] [--streams 20] [--frames 3000]
    python -m bench.run capacity [--tracks 1000] [--seconds 30] [--search]
    python -m bench.run all          # both, then bench/results/{results.json,results.md,cpu.png}
    python -m bench.run smoke        # seconds; what the test suite runs

overhead: the server process's CPU time per frame (utime+stime from /proc), for (a) the
receiver with its wav sink (on uvloop, as deployed; "receiver-asyncio" is the same on asyncio's
loop), (b) a bare websockets server with the same TLS and token check (the floor), (c) a
tutorial-style recorder, alternated over the rounds, server and load pinned to different CPUs.
capacity: K both-track streams paced in real time with the server pinned to one CPU: CPU use,
whether real time held, whether every sample reached its file, frame-to-disk lag, RSS per
stream; the same K against receiver-asyncio and the floor, for scale.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile

from receiver import tls

TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a throwaway token on loopback
SERVER_CPU, LOAD_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVERS = ("receiver", "receiver-asyncio", "floor", "tutorial")
RECEIVERS = ("receiver", "receiver-asyncio")
RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Workdir:
    root: Path
    cert: Path
    key: Path


@contextmanager
def workdir() -> Iterator[Workdir]:
    root = Path(tempfile.mkdtemp(prefix="receiver-bench-"))
    try:
        cert, key = root / "cert.pem", root / "key.pem"
        tls.write_self_signed(cert, key)
        yield Workdir(root, cert, key)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def server(
    kind: str, work: Workdir, recordings: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start one server kind pinned to SERVER_CPU; yield (process, port); stop it after."""
    port = free_port()
    recordings.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    if kind in RECEIVERS:
        argv = [sys.executable, "-m", "receiver", "serve"]
        env.update(
            RECEIVER_PORT=str(port),
            RECEIVER_HOST="127.0.0.1",
            RECEIVER_TOKENS=TOKEN,
            RECEIVER_TLS_CERT=str(work.cert),
            RECEIVER_TLS_KEY=str(work.key),
            RECEIVER_RECORDINGS_DIR=str(recordings),
            # As many as the fd limit holds (4 fds a stream; serve refuses more): the runs
            # need at most 1,000 streams.
            RECEIVER_MAX_STREAMS="3000",
            RECEIVER_MAX_CONNECTIONS_PER_IP="10000",
            RECEIVER_MAX_PENDING_HANDSHAKES_PER_IP="1000",
            RECEIVER_UI_PORT="",  # the web page is off: 8080 may be taken on a shared machine
            RECEIVER_LOG_LEVEL="WARNING",
            RECEIVER_DRAIN_TIMEOUT_S="0",
            RECEIVER_EVENT_LOOP="uvloop" if kind == "receiver" else "asyncio",
        )
    elif kind == "floor":
        argv = [
            sys.executable,
            "-m",
            "bench.floor_server",
            str(port),
            str(work.cert),
            str(work.key),
            TOKEN,
        ]
    else:
        argv = [
            sys.executable,
            "-m",
            "bench.tutorial_server",
            str(port),
            str(work.cert),
            str(work.key),
            TOKEN,
            str(recordings),
        ]
    process = subprocess.Popen(
        argv,
        env=env,
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CPU}),
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start") from None
            time.sleep(0.05)
    try:
        yield process, port
    finally:
        process.terminate()
        process.wait(timeout=30)


def loadgen_argv(port: int, work: Workdir, *args: str) -> list[str]:
    """The load generator's command line, pinned to LOAD_CPU."""
    return [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--cafile",
        str(work.cert),
        "--cpu",
        str(LOAD_CPU),
        *args,
    ]


def load(port: int, work: Workdir, *args: str) -> dict[str, Any]:
    """Run the load generator; return its JSON result."""
    argv = loadgen_argv(port, work, *args)
    out = subprocess.run(
        argv,
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def wav_lengths(recordings: Path) -> list[int]:
    """Frames of every track file under recordings (header sizes, as strict readers see them)."""
    return [soundfile.info(str(p)).frames for p in sorted(recordings.glob("*/*.wav"))]


def overhead(rounds: int, streams: int, frames: int) -> dict[str, Any]:
    """CPU microseconds per frame of each server, alternated round by round; ratios per round."""
    per_frame: dict[str, list[float]] = {kind: [] for kind in SERVERS}
    invalid = 0
    total = streams * frames * 2
    with workdir() as work:
        for round_number in range(rounds):
            for kind in SERVERS:
                recordings = work.root / f"rec-{kind}-{round_number}"
                with server(kind, work, recordings) as (process, port):
                    before = cpu_seconds(process.pid)
                    result = load(
                        port,
                        work,
                        "--mode",
                        "burst",
                        "--streams",
                        str(streams),
                        "--frames",
                        str(frames),
                        "--prefix",
                        kind,
                    )
                    time.sleep(0.3)
                    spent = cpu_seconds(process.pid) - before
                per_frame[kind].append(spent / total * 1e6)
                if kind in RECEIVERS:
                    lengths = wav_lengths(recordings)
                    if len(lengths) != 2 * streams or set(lengths) != {frames * 160}:
                        invalid += 1
                    if result["closed_by_server"] != streams:
                        invalid += 1
                shutil.rmtree(recordings, ignore_errors=True)

    def ratios(top: str, bottom: str) -> dict[str, float]:
        # A round shorter than the CPU clock's tick (10 ms: the smoke run's) measures 0.
        pairs = [t / b for t, b in zip(per_frame[top], per_frame[bottom], strict=True) if b]
        return spread(pairs) if pairs else dict.fromkeys(("min", "median", "max"), math.nan)

    return {
        "streams": streams,
        "frames_per_round": total,
        "rounds": rounds,
        "us_per_frame": {k: [round(v, 2) for v in vs] for k, vs in per_frame.items()},
        "receiver_over_floor": ratios("receiver", "floor"),
        "tutorial_over_receiver": ratios("tutorial", "receiver"),
        "receiver_asyncio_over_floor": ratios("receiver-asyncio", "floor"),
        "receiver_over_receiver_asyncio": ratios("receiver", "receiver-asyncio"),
        "invalid_receiver_rounds": invalid,
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def capacity_run(kind: str, streams: int, seconds: float) -> dict[str, Any]:
    """K=streams both-track streams paced in real time against one server kind."""
    with workdir() as work:
        recordings = work.root / "rec"
        with server(kind, work, recordings) as (process, port):
            time.sleep(0.5)
            idle_rss = rss_kib(process.pid)
            began_file = work.root / "began"
            argv = loadgen_argv(
                port,
                work,
                "--mode",
                "paced",
                "--streams",
                str(streams),
                "--seconds",
                str(seconds),
                "--prefix",
                kind,
                "--began-file",
                str(began_file),
            )
            loader = subprocess.Popen(
                argv, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True
            )
            while not began_file.exists() and loader.poll() is None:
                time.sleep(0.01)
            time.sleep(0.05)
            began = float(began_file.read_text())
            cpu0, wall0 = cpu_seconds(process.pid), time.monotonic()
            lags: list[float] = []
            rss: list[int] = []
            sampled: list[Path] = []
            while loader.poll() is None and time.time() < began + seconds - 0.5:
                time.sleep(0.5)
                rss.append(rss_kib(process.pid))
                if kind not in RECEIVERS:
                    continue
                if not sampled:
                    sampled = sorted(recordings.glob("*/inbound.wav"))[:: max(1, streams // 20)]
                now = time.time()
                for path in sampled:
                    try:
                        held = soundfile.info(str(path)).frames / 8000
                    except RuntimeError:
                        continue
                    lags.append(max(0.0, now - began - held))
            cpu1, wall1 = cpu_seconds(process.pid), time.monotonic()
            out, _ = loader.communicate(timeout=300)
            sent = json.loads(out.strip().splitlines()[-1])
            time.sleep(0.5)
            lengths = wav_lengths(recordings) if kind != "floor" else []
    frames_per_track = int(seconds * 1000 / 20)
    # Tracks whose file is missing or not exactly what was sent (the floor keeps no files).
    whole = sum(1 for n in lengths if n == frames_per_track * 160)
    tracks_short = 0 if kind == "floor" else 2 * streams - whole
    lags.sort()
    utilization = (cpu1 - cpu0) / (wall1 - wall0)
    half = len(rss) // 2
    result = {
        "server": kind,
        "streams": streams,
        "tracks": 2 * streams,
        "seconds": seconds,
        "cpu_utilization": round(utilization, 3),
        "every_sample_on_disk": tracks_short == 0,
        "tracks_short": tracks_short,
        "closed_by_server": sent["closed_by_server"],
        "send_lateness_ms_p99": sent["send_lateness_ms_p99"],
        "rss_idle_kib": idle_rss,
        "rss_peak_kib": max(rss, default=idle_rss),
        "rss_per_stream_kib": round((max(rss, default=idle_rss) - idle_rss) / streams, 1),
        "rss_first_half_kib": round(statistics.mean(rss[:half]), 0) if half else None,
        "rss_second_half_kib": round(statistics.mean(rss[half:]), 0) if half else None,
    }
    if lags:
        result["lag_ms_p50"] = round(1000 * lags[len(lags) // 2], 1)
        result["lag_ms_p99"] = round(1000 * lags[int(0.99 * (len(lags) - 1))], 1)
    result["real_time_held"] = bool(
        sent["send_lateness_ms_p99"] < 20
        and sent["closed_by_server"] == streams
        and tracks_short == 0
        and utilization < 1.0
        and (kind not in RECEIVERS or result.get("lag_ms_p99", 0) <= 300)
    )
    return result


def holds(run: dict[str, Any]) -> bool:
    """The capacity criteria of the issue: real time, every sample, <= 90% CPU, p99 lag."""
    return bool(run["real_time_held"] and run["cpu_utilization"] <= 0.90)


def capacity(tracks: int, seconds: float, search: bool) -> dict[str, Any]:
    """The run at ``tracks`` (and the same K against receiver-asyncio and the floor, which
    show how fast this machine is), then (with search) larger K until one fails."""
    runs = [capacity_run(kind, tracks // 2, seconds) for kind in (*RECEIVERS, "floor")]
    last = runs[0]
    held = [last["tracks"]] if holds(last) else []
    if search:
        streams = tracks // 2
        while holds(last) and streams < 2000:
            streams += 250
            last = capacity_run("receiver", streams, seconds)
            runs.append(last)
            held += [last["tracks"]] if holds(last) else []
    return {"runs": runs, "largest_tracks_held": max(held, default=0)}


def cpu_curve(points: list[int], seconds: float) -> dict[str, list[dict[str, Any]]]:
    """CPU utilization against tracks for the three servers (for the plot)."""
    return {kind: [capacity_run(kind, t // 2, seconds) for t in points] for kind in SERVERS}


def plot(curve: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, runs in curve.items():
        ax.plot(
            [r["tracks"] for r in runs],
            [100 * r["cpu_utilization"] for r in runs],
            marker="o",
            label=kind,
        )
    ax.axhline(90, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("real-time tracks (20 ms frames)")
    ax.set_ylabel("server CPU, % of one core")
    ax.set_title("CPU against tracks, one run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(results: dict[str, Any]) -> str:
    lines = []
    if "overhead" in results:
        o = results["overhead"]
        lines += [
            f"Overhead: {o['rounds']} rounds x {o['frames_per_round']} frames "
            f"({o['streams']} streams), server CPU per frame",
            "",
            "| server | us/frame (median) |",
            "| --- | --- |",
            *(f"| {k} | {statistics.median(v):.2f} |" for k, v in o["us_per_frame"].items()),
            "",
            "| ratio | min | median | max |",
            "| --- | --- | --- | --- |",
            *(
                f"| {name} | {o[key]['min']} | {o[key]['median']} | {o[key]['max']} |"
                for name, key in (
                    ("receiver / floor", "receiver_over_floor"),
                    ("tutorial / receiver", "tutorial_over_receiver"),
                    ("receiver-asyncio / floor", "receiver_asyncio_over_floor"),
                    ("receiver / receiver-asyncio", "receiver_over_receiver_asyncio"),
                )
            ),
            f"\nreceiver rounds with a missing sample: {o['invalid_receiver_rounds']}",
            "",
        ]
    runs = [*results.get("capacity", {}).get("runs", [])]
    for kind_runs in results.get("cpu_curve", {}).values():
        runs += kind_runs
    if runs:
        lines += [
            "| server | tracks | CPU | real time | every sample | lag p50/p99 ms "
            "| RSS/stream KiB |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in runs:
            lag = f"{r.get('lag_ms_p50', '-')}/{r.get('lag_ms_p99', '-')}"
            lines.append(
                f"| {r['server']} | {r['tracks']} | {100 * r['cpu_utilization']:.0f}% | "
                f"{r['real_time_held']} | {r['every_sample_on_disk']} | {lag} | "
                f"{r['rss_per_stream_kib']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["overhead", "capacity", "all", "smoke"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--tracks", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--search", action="store_true", help="capacity: try larger K too")
    parser.add_argument("--curve", default="250,500,1000", help="tracks for the CPU plot")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two CPUs: one for the server, one for the load")
    # This driver (it reads WAV headers for the lag) shares the load's CPU, not the server's.
    os.sched_setaffinity(0, {LOAD_CPU})
    results: dict[str, Any] = {}
    if args.what == "smoke":
        results["overhead"] = overhead(1, 2, 200)
        results["capacity"] = capacity(10, 3.0, search=False)
    if args.what in ("overhead", "all"):
        results["overhead"] = overhead(args.rounds, args.streams, args.frames)
    if args.what in ("capacity", "all"):
        results["capacity"] = capacity(args.tracks, args.seconds, args.search)
    if args.what == "all":
        points = [int(x) for x in args.curve.split(",")]
        results["cpu_curve"] = cpu_curve(points, min(args.seconds, 15.0))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.what}.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (RESULTS / f"{args.what}.md").write_text(table + "\n")
    if "cpu_curve" in results:
        plot(results["cpu_curve"], RESULTS / "cpu.png")
    print(table)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
