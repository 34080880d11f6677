"""The sink contract: where a stream's audio and events go.

A sink is created per stream (by a ``SinkFactory``) and sees the stream's whole life, in order:

1. ``open(info)`` once, after ``start`` (nothing is created before the client authenticated and
   started a stream). ``info.codec`` is ``None`` when the encoding cannot be decoded; then no
   ``write`` follows, and ``close`` says why.
2. ``write(track, position, samples)`` many times: int16 mono samples of one track, in batches
   of about ``batch_ms``, ``position`` in samples since the stream's start. Per track, batches
   come in order and are contiguous: the first starts at 0 and each starts where the previous
   ended (gaps are already filled with silence). ``samples`` may be a shared read-only view:
   never modify it, copy what you keep. ``receiver.session.is_gap_fill(samples)`` tells the
   silence filled in for a gap (slices of up to 10 s), which a sink may store cheaply (the
   wav sink: a hole in the file).
3. ``event(record)`` for each DTMF digit and mark, with its place on the timeline.
4. ``close(summary)`` once, however the stream ended (stop, client close, protocol error,
   shutdown), also after a failed ``open`` or ``write``. A sink with work to finish that would
   hold the event loop (the wav sink: the stereo mix, a large ``stream.json``; the redis sink:
   waiting for its last entry to be written) may define ``async aclose(summary)`` instead
   (``AsyncSink``), which the server awaits in its place.

Sinks close in three groups, each in turn: the others; then those with ``writes_record = True``
(the wav sink and its ``stream.json``), so that the record names what the others raised; then
those with ``delivers_record = True`` (uploads, webhooks: an optional attribute), which need
the files finished. ``summary.directory`` names where the record sink put them.

A sink that only watches (``observer = True``, like the web page's levels) is not counted when
the server checks whether any sink still records (``Fanout.alive``).

Calls come from the event loop: keep each one short (a buffered file write, a queue put). A sink
that raises is logged, counted and named in ``stream.json``; it never takes the server or the
other sinks down (see ``receiver.sinks.Fanout``).

Resources shared by every stream of a process (a Redis connection, an object store client, the
delivery queue) belong to the factory: a factory that is also a ``Lifecycle`` is started by the
``Receiver`` before its first stream and stopped after its last one. An entry point may name a
class; it is instantiated once per ``Receiver`` (``load_sink_factories``), so that nothing is
shared through module globals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from receiver.codecs import Codec
from receiver.events import Start, Track
from receiver.session import DtmfRecord, MarkRecord, TrackStats

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from receiver.settings import Settings

EndKind = Literal[
    "stop",
    "client-close",
    "protocol-error",
    "idle-timeout",
    "keepalive-timeout",
    "max-duration",
    "shutdown",
    "error",
]


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What is known when a stream starts."""

    start: Start
    path: str
    query: str
    remote: str | None
    started_at: datetime
    codec: Codec | None
    unsupported_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The stream's identity and format, as ``stream.json`` and other sinks record it."""
        start = self.start
        return {
            "stream_sid": start.stream_sid,
            "account_sid": start.account_sid,
            "call_sid": start.call_sid,
            "path": self.path,
            "query": self.query,
            "remote": self.remote,
            "announced_tracks": list(start.tracks),
            "media_format": {
                "encoding": start.media_format.encoding,
                "sample_rate_hz": start.media_format.sample_rate_hz,
                "channels": start.media_format.channels,
            },
            "codec": self.codec.name if self.codec else None,
            "custom_parameters": dict(start.custom_parameters),
            "start": dict(start.raw),
            "started_at": self.started_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a stream ended: ``kind``, the close code sent or received, and a reason."""

    kind: EndKind
    close_code: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """What happened, handed to ``close``."""

    end: StreamEnd
    ended_at: datetime
    sample_rate_hz: int
    tracks: Mapping[Track, TrackStats] = field(default_factory=dict)
    dtmf: tuple[DtmfRecord, ...] = ()
    marks: tuple[MarkRecord, ...] = ()
    messages: int = 0
    unknown_events: tuple[str, ...] = ()
    # What the stream sent past its bounds (receiver.session.Dropped, unknown event names).
    dropped: Mapping[str, int] = field(default_factory=dict)
    sink_errors: tuple[str, ...] = ()
    # Where the record sink put the files (not part of stream.json).
    directory: Path | None = None
    # What the platform's status callbacks said of the stream (receiver.status:
    # conference_sid, stream_name, platform_call_sid, platform_events), merged into as_dict.
    platform: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The stream's outcome, as ``stream.json`` records it (``platform``'s keys last; they
        never replace one of the stream's own)."""
        outcome = {
            "ended_at": self.ended_at.isoformat(),
            "end": {
                "kind": self.end.kind,
                "close_code": self.end.close_code,
                "reason": self.end.reason,
            },
            "messages": self.messages,
            "tracks": {
                track: stats.as_dict(self.sample_rate_hz) for track, stats in self.tracks.items()
            },
            "dtmf": [
                {"digit": d.digit, "at_ms": d.at_ms, "duration_ms": d.duration_ms, "track": d.track}
                for d in self.dtmf
            ],
            "marks": [{"name": m.name, "at_ms": m.at_ms} for m in self.marks],
            "unknown_events": list(self.unknown_events),
            "dropped": dict(self.dropped),
            "sink_errors": list(self.sink_errors),
        }
        for key, value in self.platform.items():
            outcome.setdefault(key, value)
        return outcome


class Sink(Protocol):
    """Receives one stream's audio and events; see the module docstring for the contract."""

    @property
    def location(self) -> str | None:
        """Where the stream went (``files in DIR``, ``redis KEY``), for its last log line."""

    @property
    def writes_record(self) -> bool:
        """True for the sink that writes ``stream.json``: it closes after the others."""

    def open(self, info: StreamInfo) -> None:
        """The stream started; ``info.codec`` is None when its audio cannot be decoded."""

    def write(self, track: Track, position: int, samples: NDArray[np.int16]) -> None:
        """Contiguous int16 samples of ``track`` from sample ``position``; do not modify them."""

    def event(self, record: DtmfRecord | MarkRecord) -> None:
        """A DTMF digit or a mark, placed on the stream's timeline."""

    def close(self, summary: StreamSummary) -> None:
        """The stream ended; finish every file. Called exactly once."""


@runtime_checkable
class AsyncSink(Sink, Protocol):
    """A sink whose end has I/O to wait for: ``aclose`` is awaited in place of ``close``."""

    async def aclose(self, summary: StreamSummary) -> None:
        """The stream ended: finish without blocking the event loop. Called exactly once."""


SinkFactory = Callable[["Settings"], Sink]
"""Builds one sink per stream from the settings; what the ``receiver.sinks`` entry points name."""


@runtime_checkable
class Lifecycle(Protocol):
    """Per-process resources of a sink factory, started and stopped by the ``Receiver``."""

    async def start(self, settings: Settings, *, registry: CollectorRegistry) -> None:
        """Before the first stream: connect, resume queues, register metrics in ``registry``."""

    async def stop(self) -> None:
        """After the last stream's sinks closed: flush what can be, release the resources."""
