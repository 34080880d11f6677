"""Benchmarks of the receiver, each printing ratios measured in one run.

    python -m bench.run overhead [--rounds 5] [--streams 20] [--frames 3000] [--servers ...]
    python -m bench.run capacity [--tracks 500,1000,2000] [--seconds 30] [--servers ...]
    python -m bench.run all      # both, then bench/results/{all.json,all.md,cpu.png}
    python -m bench.run smoke    # seconds; what the test suite runs

Servers (``--servers``, comma-separated): ``receiver-<ms>`` is ``receiver serve`` on uvloop (as
deployed) with RECEIVER_READ_INTERVAL_MS=<ms> (``receiver-asyncio-<ms>``: on asyncio's loop;
no ``-<ms>``: the server's default); ``floor`` is a bare websockets server with the same TLS and
token check that only receives, on asyncio (``floor-uvloop``: on uvloop); ``tutorial`` a
tutorial-style recorder. Default: receiver-0, receiver-50, receiver-100, floor, floor-uvloop
(and tutorial in the burst). Each round (overhead) or load (capacity) starts one server further
along the list, so no server always goes first.

overhead: the server process's CPU time per frame (utime+stime from /proc) in a burst; ratios
per round, then min/median/max. capacity: K both-track streams paced in real time with the
server pinned to one CPU: CPU use, whether real time held, whether every sample reached its
file, frame-to-disk lag against the server's own bound (read interval + batch + 100 ms), RSS
per stream and its trend; the receiver/floor CPU ratios at each load; then the issue's
targets, PASS or FAIL from these figures.
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

from bench.loadgen import FRAME_MS, PHASES
from receiver import tls

TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a throwaway token on loopback
SERVER_CPU, LOAD_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_READ_INTERVAL_MS = 100  # the receiver's RECEIVER_READ_INTERVAL_MS when unset
# The comparison: the receiver on uvloop (as deployed) at three read intervals, the
# bare websockets floor on both loops; the tutorial recorder only in the burst.
CAPACITY_SERVERS = ("receiver-0", "receiver-50", "receiver-100", "floor", "floor-uvloop")
OVERHEAD_SERVERS = (*CAPACITY_SERVERS, "tutorial")
# "Flat": the second half's mean RSS above the first half's by at most this, a stream.
RSS_GROWTH_KIB_PER_STREAM = 5.0
# Real time: every stream closed within this of its stop (a backlog the floor, which keeps
# no files to measure a lag on, would otherwise hide in the sockets' buffers).
DRAIN_LIMIT_S = 5.0
# The load generator's lateness p99 past which a paced run does not measure the server.
LATE_LIMIT_MS = 20.0
# A run where other processes took more than this of the server's CPU is marked: its
# figures are not the server's alone (a shared machine).
CONTENDED = 0.05
RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_busy_seconds(cpu: int, *, interrupts: bool = True) -> float:
    """Time CPU ``cpu`` ran anything (user, system, steal and, with ``interrupts``, irq and
    softirq: on loopback much of that is the benchmark's own packets), from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            busy = user + nice + system + steal + (irq + softirq if interrupts else 0)
            return busy / CLK_TCK
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


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


@dataclass(frozen=True)
class Kind:
    """What a server name means: ``receiver-<ms>`` (uvloop, as deployed, at that read
    interval), ``receiver-asyncio-<ms>``, ``receiver``/``receiver-asyncio`` (the server's
    default interval), ``floor`` (asyncio), ``floor-uvloop``, ``tutorial``."""

    family: str  # receiver, floor or tutorial
    loop: str  # uvloop or asyncio
    read_interval_ms: int | None = None  # receivers: RECEIVER_READ_INTERVAL_MS, None: default


def parse_kind(name: str) -> Kind:
    if name == "tutorial":
        return Kind("tutorial", "asyncio")
    if name in ("floor", "floor-uvloop"):
        return Kind("floor", "uvloop" if name == "floor-uvloop" else "asyncio")
    if name == "receiver" or name.startswith("receiver-"):
        rest = name.removeprefix("receiver").removeprefix("-")
        loop = "uvloop"
        if rest == "asyncio" or rest.startswith("asyncio-"):
            loop, rest = "asyncio", rest.removeprefix("asyncio").removeprefix("-")
        if rest == "":
            return Kind("receiver", loop)
        if rest.isdigit():
            return Kind("receiver", loop, int(rest))
    raise ValueError(
        f"unknown server {name!r}: receiver[-asyncio][-<ms>], floor, floor-uvloop, tutorial"
    )


def is_receiver(name: str) -> bool:
    return parse_kind(name).family == "receiver"


def lag_limit_ms(name: str) -> float:
    """The issue's bound on frame-to-disk lag p99: read interval + batch (200 ms) + 100 ms."""
    interval = parse_kind(name).read_interval_ms
    return (DEFAULT_READ_INTERVAL_MS if interval is None else interval) + 200 + 100


@contextmanager
def server(
    name: str, work: Workdir, recordings: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start one server pinned to SERVER_CPU; yield (process, port); stop it after."""
    kind = parse_kind(name)
    port = free_port()
    recordings.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    if kind.family == "receiver":
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
            RECEIVER_EVENT_LOOP=kind.loop,
        )
        if kind.read_interval_ms is not None:
            env["RECEIVER_READ_INTERVAL_MS"] = str(kind.read_interval_ms)
    elif kind.family == "floor":
        argv = [
            sys.executable,
            "-m",
            "bench.floor_server",
            str(port),
            str(work.cert),
            str(work.key),
            TOKEN,
            kind.loop,
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
                raise RuntimeError(f"{name} did not start") from None
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


def rotated(servers: tuple[str, ...], round_number: int) -> tuple[str, ...]:
    """The servers in this round's order: each round starts one further along, so no server
    always goes first (or always runs right after a given one)."""
    shift = round_number % len(servers)
    return servers[shift:] + servers[:shift]


def ratio_spread(per_frame: dict[str, list[float]], top: str, bottom: str) -> dict[str, float]:
    """top/bottom per round, then min/median/max."""
    # A round shorter than the CPU clock's tick (10 ms: the smoke run's) measures 0.
    pairs = [t / b for t, b in zip(per_frame[top], per_frame[bottom], strict=True) if b]
    return spread(pairs) if pairs else dict.fromkeys(("min", "median", "max"), math.nan)


def overhead(rounds: int, streams: int, frames: int, servers: tuple[str, ...]) -> dict[str, Any]:
    """CPU microseconds per frame of each server, in a rotated order round by round; ratios
    per round."""
    per_frame: dict[str, list[float]] = {name: [] for name in servers}
    invalid = 0
    total = streams * frames * 2
    orders = []
    with workdir() as work:
        for round_number in range(rounds):
            order = rotated(servers, round_number)
            orders.append(list(order))
            for name in order:
                recordings = work.root / f"rec-{name}-{round_number}"
                with server(name, work, recordings) as (process, port):
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
                        name,
                    )
                    time.sleep(0.3)
                    spent = cpu_seconds(process.pid) - before
                per_frame[name].append(spent / total * 1e6)
                if is_receiver(name):
                    lengths = wav_lengths(recordings)
                    if len(lengths) != 2 * streams or set(lengths) != {frames * 160}:
                        invalid += 1
                    if result["closed_by_server"] != streams:
                        invalid += 1
                shutil.rmtree(recordings, ignore_errors=True)
    floors = [f for f in ("floor", "floor-uvloop") if f in servers]
    ratios = {
        f"{r}/{f}": ratio_spread(per_frame, r, f) for r in servers if is_receiver(r) for f in floors
    }
    ratios.update(
        {
            f"tutorial/{r}": ratio_spread(per_frame, "tutorial", r)
            for r in servers
            if is_receiver(r) and "tutorial" in servers
        }
    )
    return {
        "streams": streams,
        "frames_per_round": total,
        "rounds": rounds,
        "orders": orders,
        "us_per_frame": {k: [round(v, 2) for v in vs] for k, vs in per_frame.items()},
        "ratios": ratios,
        "invalid_receiver_rounds": invalid,
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


def stream_index(wav: Path) -> int:
    """The load generator's number of the stream a WAV is of (its sid ends ``-<n>``)."""
    return int(wav.parent.name.rsplit("-", 1)[1])


def frame_lags(
    held_at: list[tuple[float, int, float]], began: float, lateness_ms: list[float]
) -> list[float]:
    """Frame-to-disk lag of each sample: how long ago the first frame not on disk was sent.

    The generator writes stream ``n``'s frame ``k`` at its tick ``k``, phase ``n % PHASES``:
    due at ``began + k * 20 ms + phase * 2 ms``, sent that phase's lateness after. Measured
    from when it was sent, a hiccup of the generator's is not counted as the server's lag."""
    frame_s = FRAME_MS / 1000
    lags = []
    for now, stream, held in held_at:
        frame = round(held / frame_s)
        phase = stream % PHASES
        at = frame * PHASES + phase
        if at >= len(lateness_ms):
            lags.append(0.0)  # every frame is on disk
            continue
        sent = began + frame * frame_s + phase * frame_s / PHASES + lateness_ms[at] / 1000
        lags.append(max(0.0, now - sent))
    return lags


def capacity_run(name: str, streams: int, seconds: float) -> dict[str, Any]:
    """K=streams both-track streams paced in real time against one server."""
    receiver = is_receiver(name)
    with workdir() as work:
        recordings = work.root / "rec"
        with server(name, work, recordings) as (process, port):
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
                name,
                "--began-file",
                str(began_file),
            )
            loader = subprocess.Popen(
                argv, cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True
            )
            while not began_file.exists() and loader.poll() is None:
                time.sleep(0.01)
            if not began_file.exists():
                raise RuntimeError(f"load generator failed before its schedule against {name}")
            time.sleep(0.05)
            began = float(began_file.read_text())
            cpu0, wall0 = cpu_seconds(process.pid), time.monotonic()
            busy0 = cpu_busy_seconds(SERVER_CPU, interrupts=False), cpu_busy_seconds(LOAD_CPU)
            held_at: list[tuple[float, int, float]] = []  # (time, stream, seconds on disk)
            rss: list[int] = []
            sampled: list[Path] = []
            while loader.poll() is None and time.time() < began + seconds - 0.5:
                time.sleep(0.5)
                rss.append(rss_kib(process.pid))
                if not receiver:
                    continue
                if not sampled:
                    sampled = sorted(recordings.glob("*/inbound.wav"))[:: max(1, streams // 20)]
                now = time.time()
                for path in sampled:
                    try:
                        held = soundfile.info(str(path)).frames / 8000
                    except RuntimeError:
                        continue
                    held_at.append((now, stream_index(path), held))
            cpu1, wall1 = cpu_seconds(process.pid), time.monotonic()
            busy1 = cpu_busy_seconds(SERVER_CPU, interrupts=False), cpu_busy_seconds(LOAD_CPU)
            out, _ = loader.communicate(timeout=600)
            if loader.returncode:
                raise RuntimeError(f"load generator failed against {name} ({streams} streams)")
            sent = json.loads(out.strip().splitlines()[-1])
            lags = frame_lags(held_at, began, sent["send_lateness_ms_each"])
            time.sleep(0.5)
            lengths = wav_lengths(recordings) if receiver or name == "tutorial" else []
    frames_per_track = int(seconds * 1000 / 20)
    # Tracks whose file is missing or not exactly what was sent (the floor keeps no files).
    whole = sum(1 for n in lengths if n == frames_per_track * 160)
    tracks_short = 2 * streams - whole if lengths or receiver else 0
    utilization = (cpu1 - cpu0) / (wall1 - wall0)
    half = len(rss) // 2
    peak = max(rss, default=idle_rss)
    result: dict[str, Any] = {
        "server": name,
        "streams": streams,
        "tracks": 2 * streams,
        "seconds": seconds,
        "cpu_utilization": round(utilization, 3),
        # The shared machine: what else ran on the server's CPU (other processes, steal; not
        # interrupts, mostly this run's packets), and how busy the load's CPU was in all
        # (generator, driver, anyone else).
        "server_cpu_others": round(
            max(0.0, (busy1[0] - busy0[0] - (cpu1 - cpu0)) / (wall1 - wall0)), 3
        ),
        "load_cpu_busy": round((busy1[1] - busy0[1]) / (wall1 - wall0), 3),
        "every_sample_on_disk": tracks_short == 0 if receiver or lengths else None,
        "tracks_short": tracks_short,
        "closed_by_server": sent["closed_by_server"],
        # After the schedule's end: the stop, the files finished, every close read.
        "drain_s": round(sent["drain_s"], 2),
        "handshakes_s": sent["handshakes_s"],
        "loadgen_lateness_ms_p99": sent["send_lateness_ms_p99"],
        "loadgen_tick_work_ms_p50": sent["tick_work_ms_p50"],
        "loadgen_tick_work_ms_p99": sent["tick_work_ms_p99"],
        "loadgen_cpu_utilization": sent["cpu_utilization"],
        "loadgen_stalled_writes": sent["stalled_writes"],
        "loadgen_frames_dropped": sent["frames_dropped"],
        "rss_idle_kib": idle_rss,
        "rss_peak_kib": peak,
        "rss_per_stream_kib": round((peak - idle_rss) / streams, 1),
        "rss_first_half_kib": round(statistics.mean(rss[:half]), 0) if half else None,
        "rss_second_half_kib": round(statistics.mean(rss[half:]), 0) if half else None,
    }
    result["rss_flat"] = bool(
        half
        and (result["rss_second_half_kib"] - result["rss_first_half_kib"]) / streams
        <= RSS_GROWTH_KIB_PER_STREAM
    )
    if lags:
        lags.sort()
        result["lag_ms_p50"] = round(1000 * lags[len(lags) // 2], 1)
        result["lag_ms_p99"] = round(1000 * p99(lags), 1)
    if receiver:
        result["lag_limit_ms"] = lag_limit_ms(name)
    # The generator kept its schedule: else the run measures the generator, not the server.
    result["generator_on_schedule"] = sent["send_lateness_ms_p99"] < LATE_LIMIT_MS
    result["real_time_held"] = bool(
        sent["stalled_writes"] == 0
        and sent["frames_dropped"] == 0
        and sent["closed_by_server"] == streams
        and sent["drain_s"] <= DRAIN_LIMIT_S
        and tracks_short == 0
        and utilization < 1.0
        and (
            not receiver or ("lag_ms_p99" in result and result["lag_ms_p99"] <= lag_limit_ms(name))
        )
    )
    return result


def capacity(loads: list[int], seconds: float, servers: tuple[str, ...]) -> dict[str, Any]:
    """Every server at every load (tracks), the order rotated load by load; the CPU ratios
    of each receiver to the floors at each load, from the same run."""
    runs = []
    orders = []
    for index, tracks in enumerate(loads):
        order = rotated(servers, index)
        orders.append(list(order))
        runs += [capacity_run(name, tracks // 2, seconds) for name in order]
    cpu = {(r["server"], r["tracks"]): r["cpu_utilization"] for r in runs}
    ratios = {
        f"{r}/{f}": {
            str(t): round(cpu[r, t] / cpu[f, t], 3) if cpu[f, t] else math.nan for t in loads
        }
        for r in servers
        if is_receiver(r)
        for f in ("floor", "floor-uvloop")
        if f in servers
    }
    return {"runs": runs, "orders": orders, "cpu_ratios": ratios}


def targets(results: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """The issue's targets, per receiver, checked against the figures of this run:
    (target, passed or None if not measured here, the figures)."""
    runs = {(r["server"], r["tracks"]): r for r in results.get("capacity", {}).get("runs", [])}
    ratios = results.get("capacity", {}).get("cpu_ratios", {})
    burst = results.get("overhead", {}).get("ratios", {})
    receivers = sorted(
        {name for name, _ in runs if is_receiver(name)}
        | {k.split("/")[0] for k in burst if is_receiver_key(k)},
        key=lambda n: (parse_kind(n).read_interval_ms or 0, n),
    )
    out: list[tuple[str, bool | None, str]] = []
    for r in receivers:
        run, floor = runs.get((r, 500)), runs.get(("floor", 500))
        ratio = ratios.get(f"{r}/floor", {}).get("500")
        out.append(
            (
                f"{r}: paced 500 tracks, CPU <= 0.35 x floor's (asyncio)",
                None if ratio is None or not measured(run, floor) else ratio <= 0.35,
                f"ratio {ratio}{contended(run)}{contended(floor)}{late(run, floor)}"
                if ratio is not None
                else "not measured",
            )
        )
        run = runs.get((r, 1000))
        out.append(
            (
                f"{r}: paced 1,000 tracks, <= 45% of the core, every sample, real time held "
                f"(lag p99 <= {lag_limit_ms(r):.0f} ms)",
                None
                if not measured(run)
                else bool(
                    run["cpu_utilization"] <= 0.45
                    and run["every_sample_on_disk"]
                    and run["real_time_held"]
                ),
                describe(run),
            )
        )
        run = runs.get((r, 2000))
        out.append(
            (
                f"{r}: paced 2,000 tracks, real time held with every sample",
                None
                if not measured(run)
                else bool(run["every_sample_on_disk"] and run["real_time_held"]),
                describe(run),
            )
        )
        spread_ = burst.get(f"{r}/floor")
        median = None if spread_ is None else spread_["median"]
        out.append(
            (
                f"{r}: burst overhead receiver/floor median <= 0.6",
                None if median is None or math.isnan(median) else median <= 0.6,
                f"median {median}" if median is not None else "not measured",
            )
        )
        mine = [run for (name, _), run in sorted(runs.items()) if name == r]
        out.append(
            (
                f"{r}: RSS per active stream <= 100 KiB, flat, at every load",
                None
                if not mine
                else all(m["rss_per_stream_kib"] <= 100 and m["rss_flat"] for m in mine),
                ", ".join(
                    f"{m['tracks']}: {m['rss_per_stream_kib']} KiB, "
                    f"{m['rss_first_half_kib']}->{m['rss_second_half_kib']}"
                    for m in mine
                )
                or "not measured",
            )
        )
    return out


def is_receiver_key(key: str) -> bool:
    name = key.split("/")[0]
    try:
        return is_receiver(name)
    except ValueError:
        return False


def measured(*runs: dict[str, Any] | None) -> bool:
    """Whether paced runs measured their servers: run, and the generator kept its schedule."""
    return all(run is not None and run["generator_on_schedule"] for run in runs)


def describe(run: dict[str, Any] | None) -> str:
    if run is None:
        return "not measured"
    return (
        f"CPU {100 * run['cpu_utilization']:.0f}%, real time {run['real_time_held']}, "
        f"every sample {run['every_sample_on_disk']}, lag p99 {run.get('lag_ms_p99', '-')} ms, "
        f"loadgen p99 {run['loadgen_lateness_ms_p99']} ms{contended(run)}{late(run)}"
    )


def late(*runs: dict[str, Any] | None) -> str:
    """A mark for paced runs whose load generator fell behind its schedule: not a verdict."""
    behind = [run for run in runs if run is not None and not run["generator_on_schedule"]]
    if not behind:
        return ""
    which = ", ".join(f"{run['server']}'s" for run in behind)
    return (
        f" [the load generator fell behind in {which} run (lateness p99 >= "
        f"{LATE_LIMIT_MS:.0f} ms): not a measurement of the server, rerun]"
    )


def contended(run: dict[str, Any] | None) -> str:
    """A mark for figures other processes shared the server's CPU with."""
    if run is None or run["server_cpu_others"] <= CONTENDED:
        return ""
    return f" [contended: others took {100 * run['server_cpu_others']:.0f}% of the server's CPU]"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["server"] for r in runs):
        mine = sorted((r for r in runs if r["server"] == name), key=lambda r: r["tracks"])
        ax.plot(
            [r["tracks"] for r in mine],
            [100 * r["cpu_utilization"] for r in mine],
            marker="o",
            label=name,
        )
    ax.axhline(45, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("real-time tracks (20 ms frames)")
    ax.set_ylabel("server CPU, % of one core")
    ax.set_title("CPU against tracks, one run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(results: dict[str, Any], *, with_targets: bool = True) -> str:
    lines = []
    if "overhead" in results:
        o = results["overhead"]
        lines += [
            f"Overhead: {o['rounds']} rounds x {o['frames_per_round']} frames "
            f"({o['streams']} streams), server CPU per frame; order of round 1: "
            f"{', '.join(o['orders'][0])} (rotated by one each round)",
            "",
            "| server | us/frame (median) |",
            "| --- | --- |",
            *(f"| {k} | {statistics.median(v):.2f} |" for k, v in o["us_per_frame"].items()),
            "",
            "| ratio | min | median | max |",
            "| --- | --- | --- | --- |",
            *(
                f"| {name} | {v['min']} | {v['median']} | {v['max']} |"
                for name, v in o["ratios"].items()
            ),
            f"\nreceiver rounds with a missing sample: {o['invalid_receiver_rounds']}",
            "",
        ]
    if "capacity" in results:
        c = results["capacity"]
        lines += [
            "Paced capacity, server on one CPU; order per load: "
            + "; ".join(", ".join(o) for o in c["orders"]),
            "",
            "| server | tracks | CPU | real time | every sample | lag p50/p99 ms (limit) "
            "| drain s | RSS/stream KiB | RSS 1st/2nd half KiB | loadgen p99 ms, CPU; CPU 1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(c["runs"], key=lambda r: (r["tracks"], r["server"])):
            lag = f"{r.get('lag_ms_p50', '-')}/{r.get('lag_ms_p99', '-')}"
            if "lag_limit_ms" in r:
                lag += f" ({r['lag_limit_ms']:.0f})"
            loadgen_cpu = r["loadgen_cpu_utilization"]
            others = r["server_cpu_others"]
            lines.append(
                f"| {r['server']} | {r['tracks']} | {100 * r['cpu_utilization']:.0f}%"
                f"{f' (+{100 * others:.0f}% others)' if others > CONTENDED else ''} | "
                f"{r['real_time_held']} | {r['every_sample_on_disk']} | {lag} | "
                f"{r['drain_s']} | {r['rss_per_stream_kib']} | "
                f"{r['rss_first_half_kib']}/{r['rss_second_half_kib']} | "
                f"{r['loadgen_lateness_ms_p99']}, "
                f"{'-' if loadgen_cpu is None else f'{100 * loadgen_cpu:.0f}%'}; "
                f"{100 * r['load_cpu_busy']:.0f}% |"
            )
        loads = sorted({r["tracks"] for r in c["runs"]})
        lines += [
            "",
            "| CPU ratio | " + " | ".join(f"{t} tracks" for t in loads) + " |",
            "| --- |" + " --- |" * len(loads),
            *(
                f"| {name} | " + " | ".join(str(v[str(t)]) for t in loads) + " |"
                for name, v in c["cpu_ratios"].items()
            ),
            "",
        ]
    checked = targets(results) if with_targets else []
    if checked:
        lines += ["Targets (issue 13):", ""]
        for target, passed, figures in checked:
            verdict = "n/a " if passed is None else ("PASS" if passed else "FAIL")
            lines.append(f"- {verdict} {target}: {figures}")
    return "\n".join(lines)


def names(text: str) -> tuple[str, ...]:
    out = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in out:
        parse_kind(name)  # unknown names fail before any run
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["overhead", "capacity", "all", "smoke"])
    parser.add_argument("--rounds", type=int, default=5, help="overhead: rounds")
    parser.add_argument("--streams", type=int, default=20, help="overhead: streams a round")
    parser.add_argument("--frames", type=int, default=3000, help="overhead: frames a track")
    parser.add_argument("--tracks", default="500,1000,2000", help="capacity: loads, in tracks")
    parser.add_argument("--seconds", type=float, default=30.0, help="capacity: each run's length")
    parser.add_argument("--servers", type=names, help="comma-separated; default: the issue's")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two CPUs: one for the server, one for the load")
    loads = [int(x) for x in args.tracks.split(",")]
    if any(t <= 0 or t % 2 for t in loads):
        sys.exit("--tracks: even numbers of tracks (streams have both tracks)")
    # This driver (it reads WAV headers for the lag) shares the load's CPU, not the server's.
    os.sched_setaffinity(0, {LOAD_CPU})
    results: dict[str, Any] = {}
    if args.what == "smoke":
        results["overhead"] = overhead(1, 2, 200, args.servers or OVERHEAD_SERVERS)
        results["capacity"] = capacity([10], 2.0, args.servers or CAPACITY_SERVERS)
    if args.what in ("overhead", "all"):
        results["overhead"] = overhead(
            args.rounds, args.streams, args.frames, args.servers or OVERHEAD_SERVERS
        )
    if args.what in ("capacity", "all"):
        results["capacity"] = capacity(loads, args.seconds, args.servers or CAPACITY_SERVERS)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.what}.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, with_targets=args.what != "smoke")
    (RESULTS / f"{args.what}.md").write_text(table + "\n")
    if args.what in ("capacity", "all"):
        plot(results["capacity"]["runs"], RESULTS / "cpu.png")
    print(table)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
