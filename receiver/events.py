"""The typed events of a media stream, as parsed by :mod:`receiver.protocol`.

``Event`` is the union the server dispatches on with ``match`` ending in ``assert_never``.
Every event is immutable: frozen dataclasses, and a NamedTuple for the per-frame ``Media``;
ids stay opaque text (never trusted in a file path).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, NewType

StreamSid = NewType("StreamSid", str)

Track = Literal["inbound", "outbound"]
TRACKS: tuple[Track, ...] = ("inbound", "outbound")

# Normalised (lower-case) names of the encodings we decode; see receiver.codecs.
Encoding = Literal["audio/x-mulaw", "audio/x-alaw", "audio/x-l16"]


@dataclass(frozen=True, slots=True)
class MediaFormat:
    """``start.mediaFormat``: ``encoding`` as sent (matched case-insensitively), rate, channels."""

    encoding: str
    sample_rate_hz: int
    channels: int = 1


@dataclass(frozen=True, slots=True)
class Connected:
    """The first message: names the protocol; the version is informative only."""

    protocol: str | None = None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class Start:
    """Stream metadata. ``raw`` keeps the whole ``start`` object verbatim for the record."""

    stream_sid: StreamSid
    media_format: MediaFormat
    tracks: tuple[str, ...] = ()
    account_sid: str | None = None
    call_sid: str | None = None
    custom_parameters: Mapping[str, Any] = field(default_factory=dict)
    sequence_number: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


class Media(NamedTuple):
    """One frame of audio of one track; ``payload`` is the raw encoded bytes (base64-decoded).

    A NamedTuple rather than a frozen dataclass like the other events: it is built for every
    frame, and a frozen dataclass costs several times more to construct (``python -m
    bench.core`` prints both and their ratio).
    """

    track: Track
    payload: bytes
    chunk: int | None = None
    timestamp_ms: int | None = None
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A key press. SignalWire sends ``duration`` (ms); Twilio sends the ``track``."""

    digit: str
    duration_ms: int | None = None
    track: Track | None = None
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    """A named mark (echoed in bidirectional mode once its audio has played)."""

    name: str
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """The last message. ``raw`` keeps Twilio's ``stop`` object, if any, for the record."""

    sequence_number: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event name this version does not know: logged once per stream, then skipped."""

    name: str


Event = Connected | Start | Media | Dtmf | Mark | Stop | UnknownEvent
