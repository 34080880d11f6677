"""An in-memory sink: the real double for tests and for embedding the receiver in a program."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from receiver.events import Track
from receiver.session import DtmfRecord, MarkRecord
from receiver.sinks.base import StreamInfo, StreamSummary


class MemorySink:
    """Keeps one stream's audio per track as int16 arrays, its events, info and summary.

    It checks the sink contract as it goes (batches contiguous per track, one open, one close)
    and raises ``AssertionError`` when the caller breaks it.
    """

    location: str | None = None
    writes_record = False

    def __init__(self) -> None:
        self.info: StreamInfo | None = None
        self.summary: StreamSummary | None = None
        self.events: list[DtmfRecord | MarkRecord] = []
        self._chunks: dict[Track, list[NDArray[np.int16]]] = {}
        self._lengths: dict[Track, int] = {}

    def open(self, info: StreamInfo) -> None:
        """Remember the stream's info."""
        assert self.info is None, "open called twice"
        self.info = info

    def write(self, track: Track, position: int, samples: NDArray[np.int16]) -> None:
        """Keep a copy of the batch."""
        assert self.info is not None and self.summary is None, "write outside open..close"
        length = self._lengths.get(track, 0)
        assert position == length, f"{track}: batch at {position}, expected {length}"
        self._chunks.setdefault(track, []).append(samples.copy())
        self._lengths[track] = length + len(samples)

    def event(self, record: DtmfRecord | MarkRecord) -> None:
        """Keep the event."""
        self.events.append(record)

    def close(self, summary: StreamSummary) -> None:
        """Remember how the stream ended."""
        assert self.summary is None, "close called twice"
        self.summary = summary

    def audio(self, track: Track) -> NDArray[np.int16]:
        """All samples of ``track`` so far, from the stream's start."""
        chunks = self._chunks.get(track, [])
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    @property
    def tracks(self) -> list[Track]:
        """Tracks that sent audio, in order of their first batch."""
        return list(self._chunks)
