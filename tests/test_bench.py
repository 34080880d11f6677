"""The benchmark harness works end to end (its figures are for bench/, never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import frame_lags

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the benchmark pins two CPUs")
def test_bench_smoke_runs_and_every_sample_lands() -> None:
    """`python -m bench.run smoke`: both benchmarks run, and every sample reached its file."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    overhead = results["overhead"]
    assert overhead["invalid_receiver_rounds"] == 0
    issue = {"receiver-0", "receiver-50", "receiver-100", "floor", "floor-uvloop"}
    assert set(overhead["us_per_frame"]) == {*issue, "tutorial"}
    runs = {run["server"]: run for run in results["capacity"]["runs"]}
    assert set(runs) == issue
    for name, run in runs.items():
        assert run["tracks"] == 10
        assert run["closed_by_server"] == 5
        assert run["loadgen_frames_dropped"] == 0
        # The floor keeps no files; every receiver's track holds every sample sent.
        assert run["every_sample_on_disk"] is (None if name.startswith("floor") else True)
        assert isinstance(run["generator_on_schedule"], bool)
        if not name.startswith("floor"):
            assert run["lag_ms_p99"] >= run["lag_ms_p50"] >= 0
    assert "| receiver-100/floor |" in result.stdout


def test_frame_lag_counts_from_when_the_frame_was_sent() -> None:
    """Stream 13 (phase 3 of 10) holds 1.0 s: its frame 50 was due at 1.006 s, sent 80 ms
    late (a hiccup of the generator's), so at 1.2 s its lag is 114 ms, not 200."""
    lateness = [0.0] * (100 * 10)
    lateness[50 * 10 + 3] = 80.0
    began = 1000.0
    lags = frame_lags([(began + 1.2, 13, 1.0), (began + 2.5, 13, 2.0)], began, lateness)
    assert lags[0] == pytest.approx(0.114)
    assert lags[1] == 0.0  # all 100 frames on disk
