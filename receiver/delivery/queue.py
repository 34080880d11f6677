"""The delivery queue, on disk: a file per pending thing, so that a crash loses nothing.

Under ``<recordings_dir>/.delivery/``:

- ``streams/<token>.json``: a live stream of this receiver (written when it starts). Resolved
  when its files are finished (or, after a crash, at the next start-up, once repaired) into:
- ``uploads/<directory>.json``: a finished stream whose files are not all in the store yet;
- ``webhooks/<time>-<id>.json``: one event to POST, with its stable id.

Every file is written whole (``write_json_atomic``) and removed only once its work is done, so
delivery is at least once; ids derived from the stream's token keep a repeat recognisable.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from receiver.sinks.wav import write_json_atomic

DELIVERY_DIR = ".delivery"


@dataclass(frozen=True, slots=True)
class QueueDirs:
    """The queue's directories under one recordings directory."""

    root: Path

    @classmethod
    def under(cls, recordings_dir: Path) -> QueueDirs:
        return cls(recordings_dir / DELIVERY_DIR)

    @property
    def streams(self) -> Path:
        return self.root / "streams"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def webhooks(self) -> Path:
        return self.root / "webhooks"

    def make(self) -> None:
        for directory in (self.streams, self.uploads, self.webhooks):
            directory.mkdir(parents=True, exist_ok=True)


def write_item(path: Path, item: dict[str, Any]) -> None:
    """Put one queue item on disk, whole."""
    write_json_atomic(path, item)


def read_item(path: Path) -> dict[str, Any] | None:
    """A queue item, or None when it vanished or is unreadable (a torn ``.tmp`` is ignored)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def items(directory: Path) -> list[Path]:
    """The queue's items in a directory, oldest name first."""
    try:
        return sorted(p for p in directory.iterdir() if p.suffix == ".json")
    except FileNotFoundError:
        return []


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with jitter, per queue item, for ever (nothing is dropped)."""

    first_s: float
    max_s: float
    attempts: dict[str, int] = field(default_factory=dict)
    not_before: dict[str, float] = field(default_factory=dict)

    def failed(self, name: str) -> float:
        """Count a failure of ``name``; returns the delay before its next attempt."""
        attempt = self.attempts.get(name, 0)
        self.attempts[name] = attempt + 1
        base: float = min(self.max_s, self.first_s * 2.0**attempt)
        delay = base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
        self.not_before[name] = time.monotonic() + delay
        return delay

    def succeeded(self, name: str) -> None:
        self.attempts.pop(name, None)
        self.not_before.pop(name, None)

    def retain(self, names: set[str]) -> None:
        """Forget the items that left the queue by another way (a ``receiver upload``, a hand):
        a stale due time would wake the worker at once, pass after pass."""
        for gone in self.not_before.keys() - names:
            self.succeeded(gone)

    def ready(self, name: str) -> bool:
        return time.monotonic() >= self.not_before.get(name, 0.0)

    def next_due_s(self) -> float | None:
        """Seconds until the earliest waiting item is due (None when nothing waits)."""
        if not self.not_before:
            return None
        return max(0.0, min(self.not_before.values()) - time.monotonic())
