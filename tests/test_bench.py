"""The benchmark harness works end to end (its figures are for bench/, never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "| receiver-100/floor |" in result.stdout
