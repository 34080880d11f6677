"""Reading a receiver's recordings back: a stream's directory, its ``stream.json``, the tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from receiver.server import Receiver


def recording(receiver: Receiver, sid: str) -> Path:
    """The directory of the (only) recording of ``sid``."""
    path = receiver.settings.recordings_dir / sid
    assert path.is_dir(), f"no recording directory for {sid}: {list_tree(receiver)}"
    return path


def list_tree(receiver: Receiver) -> list[str]:
    """Every path below the recordings directory, relative to it."""
    root = receiver.settings.recordings_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def record_of(directory: Path) -> dict[str, Any]:
    """The ``stream.json`` of a recording directory."""
    return dict(json.loads((directory / "stream.json").read_text()))


def dir_bytes(path: Path) -> int:
    """The bytes of every file below ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
