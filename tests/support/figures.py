"""The figures of a soak or chaos run: one attack measured (RSS after a full gc, fds, the attack's
counter and log line, the good stream beside it), and the report files they are saved to."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from receiver.gate import TRIM_AFTER_CONNECTIONS
from tests.support.clients import Target, good_stream, target
from tests.support.http import http_get, metric_total
from tests.support.probe import GoodStream, ProbeResult
from tests.support.server_process import ProcFigures, ServerProcess, log_problems
from tests.support.waits import wait_until

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


async def memory_counts(goal: Target) -> tuple[float, float]:
    """The server's closed connections and memory trims so far (from /metrics)."""
    body = (await http_get(goal.port, "/metrics", goal.client_ssl))[2]
    closed = metric_total(body, "receiver_connections_closed")
    return closed, metric_total(body, "receiver_memory_trims")


async def settle_memory(goal: Target, since: tuple[float, float], limit_s: float = 15.0) -> None:
    """When enough connections closed since ``since`` (a ``memory_counts``) for the server to
    hand their memory back (its memory trim, once their wave is over), wait for that trim."""
    closed, trims = await memory_counts(goal)
    if closed - since[0] < TRIM_AFTER_CONNECTIONS:
        return
    deadline = time.monotonic() + limit_s
    while trims <= since[1] and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # another process: nothing to await but its counter
        trims = (await memory_counts(goal))[1]
    assert trims > since[1], f"no memory trim after {closed - since[0]:g} connections closed"


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
    assert (await http_get(goal.port, "/healthz", goal.client_ssl))[0] == 200
    good = GoodStream(port=server.port, cert=cert, server_pid=server.pid, sid=f"good-{name}")
    await good_stream(goal, "warm-up", frames=25)  # every lazy set-up done before the baseline
    await http_get(goal.port, "/metrics", goal.client_ssl)
    await asyncio.sleep(0.2)
    await server.collect_garbage()
    before = server.figures()
    counts = await memory_counts(goal)
    good.start()
    await asyncio.sleep(0.3)
    attack_started = time.monotonic()
    figures = await attack()
    attack_s = time.monotonic() - attack_started
    await asyncio.sleep(0.3)
    probe = await good.stop()
    await settle_fds(server, before.fds, settle_s)
    await asyncio.sleep(0.3)
    await settle_memory(goal, counts)
    await server.collect_garbage()
    after = server.figures()
    status, _, metrics = await http_get(goal.port, "/metrics", goal.client_ssl)
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


# ---------------------------------------------------------------------------------------------
# Reports
def report(path: str | None, name: str, figures: dict[str, Any]) -> None:
    """Print one soak's figures, and add them under ``name`` to the JSON file ``path``."""
    print(json.dumps({name: figures}, indent=2, default=str))
    if path:
        target = Path(path)
        merged = json.loads(target.read_text()) if target.exists() and target.stat().st_size else {}
        merged[name] = figures
        target.write_text(json.dumps(merged, indent=2, default=str))
