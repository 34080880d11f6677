"""Whether this receiver can record right now, as ``/healthz`` tells a load balancer.

The check (create a file in the recordings directory, read the free space) runs in a thread at
most once a ``interval_s``; ``/healthz`` reads the last answer, so that a slow or stuck disk
never holds the event loop.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from concurrent.futures import Executor
from pathlib import Path

from receiver.metrics import Count, Counters


class HealthCheck:
    """``problem()``: None when streams can be recorded, else why not (one line)."""

    def __init__(
        self,
        recordings_dir: Path,
        *,
        min_free_bytes: int,
        counters: Counters,
        executor: Executor | None = None,
        interval_s: float = 1.0,
    ) -> None:
        self.recordings_dir = recordings_dir
        self.min_free_bytes = min_free_bytes
        self.interval_s = interval_s
        self._counters = counters
        self._executor = executor
        self._problem: tuple[str, str] | None = None
        self._checked_at = -float("inf")
        self._running: asyncio.Future[None] | None = None

    def check_now(self) -> None:
        """Run the check here and now (at start-up, and in the refresh thread)."""
        self._problem = self._check()
        self._checked_at = time.monotonic()

    def problem(self) -> str | None:
        """The last answer; starts a refresh in a thread when it is older than the interval."""
        if time.monotonic() - self._checked_at >= self.interval_s and self._running is None:
            loop = asyncio.get_running_loop()
            self._running = loop.run_in_executor(self._executor, self.check_now)
            self._running.add_done_callback(self._refreshed)
        if self._problem is None:
            return None
        reason, text = self._problem
        self._counters.add(Count.HEALTH_FAILURES, reason)
        return text

    def _refreshed(self, _: asyncio.Future[None]) -> None:
        self._running = None

    def _check(self) -> tuple[str, str] | None:
        directory = self.recordings_dir
        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            return "not_writable", f"recordings directory not writable: {exc.strerror or exc}"
        try:
            stats = os.statvfs(directory)
        except OSError as exc:
            return "not_writable", f"recordings directory unreadable: {exc.strerror or exc}"
        free = stats.f_bavail * stats.f_frsize
        if free < self.min_free_bytes:
            return (
                "disk_full",
                f"disk nearly full: {free // (1024 * 1024)} MB free, "
                f"RECEIVER_MIN_FREE_DISK_MB is {self.min_free_bytes // (1024 * 1024)}",
            )
        return None
