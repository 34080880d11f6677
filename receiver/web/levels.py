"""Live streams as the web page shows them: a sink that keeps each track's latest level.

``LiveLevels.sink()`` is listed beside the other sinks when the page is on. Its ``write`` is the
only work the page adds to a stream's path: one RMS and one peak of the batch with numpy
(a few microseconds for 200 ms of audio), kept as two floats per track. Nothing else is kept, so
memory is a few hundred bytes per live stream whatever its length.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from receiver.events import Track
from receiver.session import DtmfRecord, MarkRecord
from receiver.sinks.base import SinkFactory, StreamInfo, StreamSummary
from receiver.web.recordings import shown_parameters

if TYPE_CHECKING:
    from receiver.settings import Settings

_FULL_SCALE = 32768.0


# The fields of a stream's info that its live row shows (besides its custom parameters).
_SHOWN_INFO = ("stream_sid", "call_sid", "path", "codec", "started_at")


@dataclass(slots=True)
class TrackLevel:
    """The latest batch of one track: its RMS and peak (0..1 of full scale), and its length."""

    rms: float = 0.0
    peak: float = 0.0
    samples: int = 0


@dataclass(slots=True)
class LiveState:
    """One live stream: what ``start`` said and the latest level of each track."""

    key: int
    info: dict[str, Any]
    sample_rate_hz: int
    started_monotonic: float
    tracks: dict[str, TrackLevel] = field(default_factory=dict)
    dtmf: list[str] = field(default_factory=list)
    marks: int = 0
    batches: int = 0

    def snapshot(self) -> dict[str, Any]:
        """The JSON form the API and the page use."""
        info = self.info
        return {
            "id": self.key,
            "stream_sid": info["stream_sid"],
            "call_sid": info["call_sid"],
            "path": info["path"],
            "codec": info["codec"],
            "sample_rate_hz": self.sample_rate_hz,
            "custom_parameters": info["custom_parameters"],
            "started_at": info["started_at"],
            "duration_s": round(
                max((t.samples for t in self.tracks.values()), default=0) / self.sample_rate_hz, 3
            ),
            "tracks": {
                name: {"rms": round(t.rms, 4), "peak": round(t.peak, 4)}
                for name, t in self.tracks.items()
            },
            "dtmf": "".join(self.dtmf[-_MAX_DIGITS_SHOWN:]),
            "marks": self.marks,
            "batches": self.batches,
        }


_MAX_DIGITS_SHOWN = 32


class LiveLevels:
    """The live streams of this process, fed by ``LevelsSink`` (one per stream)."""

    def __init__(self) -> None:
        self.streams: dict[int, LiveState] = {}
        self._keys = itertools.count(1)

    def sink(self, name: str = "web") -> tuple[str, SinkFactory]:
        """The ``(name, factory)`` pair to list in ``Receiver(sink_factories=...)``."""
        return name, self._make_sink

    def snapshot(self) -> list[dict[str, Any]]:
        """Every live stream, oldest first."""
        return [state.snapshot() for state in self.streams.values()]

    def _make_sink(self, settings: Settings) -> LevelsSink:
        return LevelsSink(self)


class LevelsSink:
    """Keeps the latest level of each track of one stream in ``LiveLevels``.

    An ``observer``: it records nothing, so the server's "every sink failed" check ignores it.
    """

    observer = True
    location: str | None = None
    writes_record = False

    def __init__(self, levels: LiveLevels) -> None:
        self._levels = levels
        self._state: LiveState | None = None

    def open(self, info: StreamInfo) -> None:
        """Register the stream as live."""
        rate = info.codec.sample_rate_hz if info.codec else info.start.media_format.sample_rate_hz
        key = next(self._levels._keys)
        record = info.as_dict()
        # Only what a live view shows: it is sent to every open view ten times a second.
        shown = {name: record[name] for name in _SHOWN_INFO}
        shown["custom_parameters"] = shown_parameters(record["custom_parameters"])
        self._state = LiveState(key, shown, max(rate, 1), time.monotonic())
        self._levels.streams[key] = self._state

    def write(self, track: Track, position: int, samples: NDArray[np.int16]) -> None:
        """The batch's RMS and peak; nothing of the audio is kept."""
        state = self._state
        if state is None or not len(samples):
            return
        level = state.tracks.get(track)
        if level is None:
            level = state.tracks[track] = TrackLevel()
        as_float = samples.astype(np.float32)
        level.rms = float(np.sqrt(np.dot(as_float, as_float) / len(as_float))) / _FULL_SCALE
        level.peak = float(np.max(np.abs(as_float))) / _FULL_SCALE
        level.samples = position + len(samples)
        state.batches += 1

    def event(self, record: DtmfRecord | MarkRecord) -> None:
        """Count DTMF digits (the last few are shown) and marks."""
        if self._state is None:
            return
        if isinstance(record, DtmfRecord):
            self._state.dtmf.append(record.digit)
            del self._state.dtmf[:-_MAX_DIGITS_SHOWN]
        else:
            self._state.marks += 1

    def close(self, summary: StreamSummary) -> None:
        """The stream is no longer live; its record is in the recordings directory."""
        if self._state is not None:
            self._levels.streams.pop(self._state.key, None)
            self._state = None
