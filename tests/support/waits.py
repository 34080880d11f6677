"""Waiting for a condition that no event announces: another process's state, or a figure of
the server's that it never signals. Polled every 50 ms and always bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(condition: Callable[[], bool], *, limit_s: float = 10.0) -> None:
    """Wait for ``condition``; TimeoutError after ``limit_s``."""
    async with asyncio.timeout(limit_s):
        while not condition():
            await asyncio.sleep(0.05)


async def wait_until(predicate: Callable[[], bool], limit_s: float) -> bool:
    """Poll ``predicate`` for at most ``limit_s``; whether it came true."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()
