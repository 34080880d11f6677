"""The redis sink's wire format: keys, entry fields and their encoding, for both sides.

The sink encodes with these functions and ``receiver consume`` decodes with them, so the format
is written down once (``docs/redis.md`` describes it for other consumers). Control entries carry
``v`` = ``FORMAT_VERSION``; a reader refuses another version rather than guess.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from redis.typing import EncodableT, FieldT

from receiver.events import TRACKS
from receiver.sinks.wav import safe_dirname

FORMAT_VERSION = 1

ControlKind = Literal["start", "dtmf", "mark", "gap", "stop"]
CONTROL_KINDS: tuple[ControlKind, ...] = ("start", "dtmf", "mark", "gap", "stop")

# What ``make_stream_id`` makes: safe_dirname(sid) "." 8 hex digits. Anything else in a start
# entry was not written by a receiver, and never becomes a directory name.
STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\.[0-9a-f]{8}")

Fields = dict[FieldT, EncodableT]


class WireError(ValueError):
    """An entry that does not follow the format (or another version of it)."""


def make_stream_id(stream_sid: str) -> str:
    """A key-safe id for a new stream: the sid as a directory name, and 8 random hex digits."""
    return f"{safe_dirname(stream_sid)}.{secrets.token_hex(4)}"


def stream_keys(prefix: str, stream_id: str) -> dict[str, str]:
    """The keys of one stream: ``events`` and one per track."""
    base = f"{prefix}:stream:{stream_id}"
    return {"events": f"{base}:events", **{track: f"{base}:{track}" for track in TRACKS}}


def control_key(prefix: str) -> str:
    """The stream of every stream's start, dtmf, mark, gap and stop entries."""
    return f"{prefix}:control"


def to_json(value: Any) -> str:
    """Compact ASCII JSON: client text may hold lone surrogates that UTF-8 cannot carry."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def control_fields(kind: ControlKind, *, stream_id: str, rate_hz: int, body: str) -> Fields:
    """A control entry; ``body`` is the ``data`` JSON (``to_json`` of a dict)."""
    return {
        "v": FORMAT_VERSION,
        "type": kind,
        "stream_id": stream_id,
        "rate": rate_hz,
        "data": body,
    }


def audio_fields(*, position: int, rate_hz: int, samples: NDArray[np.int16]) -> Fields:
    """An audio entry: int16 little-endian samples placed at ``position``."""
    payload = samples.astype("<i2", copy=False).tobytes()
    return {"position": position, "rate": rate_hz, "samples": payload}


@dataclass(frozen=True, slots=True)
class ControlEntry:
    """A decoded control entry."""

    kind: ControlKind
    stream_id: str
    rate_hz: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AudioEntry:
    """A decoded audio entry."""

    position: int
    rate_hz: int
    samples: NDArray[np.int16]


def text(value: object) -> str:
    """A reply's bytes as text (ids, keys, names are ASCII)."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def read_control(fields: Mapping[bytes, bytes]) -> ControlEntry:
    """Decode a control entry; ``WireError`` for another version or a malformed one."""
    version = text(fields.get(b"v", b""))
    if version != str(FORMAT_VERSION):
        raise WireError(f"format version {version!r}, this reader knows {FORMAT_VERSION}")
    kind_text = text(fields.get(b"type", b""))
    kind = next((k for k in CONTROL_KINDS if k == kind_text), None)
    if kind is None:
        raise WireError(f"unknown entry type {kind_text[:32]!r}")
    try:
        rate = int(fields.get(b"rate", b"0"))
        data = json.loads(fields.get(b"data", b"{}"))
    except ValueError as exc:
        raise WireError(f"unreadable rate or data: {exc}") from None
    if not isinstance(data, dict):
        raise WireError("data is not a JSON object")
    stream_id = text(fields.get(b"stream_id", b""))
    return ControlEntry(kind, stream_id, rate, data)


def read_audio(fields: Mapping[bytes, bytes], *, default_rate_hz: int) -> AudioEntry:
    """Decode an audio entry; ``WireError`` when a field is missing or wrong."""
    try:
        position = int(fields[b"position"])
        rate = int(fields.get(b"rate", b"0")) or default_rate_hz
        raw = fields[b"samples"]
    except (KeyError, ValueError) as exc:
        raise WireError(f"bad audio entry: {exc}") from None
    if position < 0:
        raise WireError(f"negative position {position}")
    if len(raw) % 2:
        raise WireError("odd number of sample bytes")
    return AudioEntry(position, rate, np.frombuffer(raw, dtype="<i2").astype(np.int16))
