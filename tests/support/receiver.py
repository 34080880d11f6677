"""A receiver in the test's process: its tokens, settings, URL, and waiting for it to be idle."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from receiver.server import Receiver
from receiver.settings import Settings

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "rotated-token-abcdef0123456789"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


def make_settings(recordings: Path, **overrides: Any) -> Settings:
    """Settings for a test receiver: loopback, port 0, the test token, no .env file."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "tokens": [TOKEN, OTHER_TOKEN],
        "recordings_dir": recordings,
        "drain_timeout_s": 0.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


StartReceiver = Callable[..., Awaitable[Receiver]]


def url(receiver: Receiver, path: str = "/media", *, scheme: str = "wss") -> str:
    """The receiver's URL on loopback."""
    return f"{scheme}://localhost:{receiver.port}{path}"


async def wait_idle(receiver: Receiver, *, timeout_s: float = 10.0) -> None:
    """Wait until the receiver has finished every stream (files closed).

    The receiver announces no such moment: this wakes when one of its connection handlers
    ends, and every 50 ms for a stream whose files are finished while its close handshake goes
    on (it stops counting then, before its handler ends)."""
    async with asyncio.timeout(timeout_s):
        while receiver.active_streams:
            handlers = set(receiver._handlers)
            if handlers:
                await asyncio.wait(handlers, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(0.05)
