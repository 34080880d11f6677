"""The sink's view of a session's output, asserting the sink contract as batches come."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from receiver.events import Track
from receiver.session import AudioBatch


class Timeline:
    """Collects batches per track, asserting the sink contract (each track contiguous from 0)."""

    def __init__(self) -> None:
        self.parts: dict[Track, list[NDArray[np.int16]]] = {}
        self.lengths: dict[Track, int] = {}
        self.batches = 0

    def add(self, batches: list[AudioBatch]) -> None:
        for batch in batches:
            assert batch.track in ("inbound", "outbound")
            assert batch.position == self.lengths.get(batch.track, 0), "batch not contiguous"
            assert batch.samples.dtype == np.int16 and batch.samples.ndim == 1
            self.parts.setdefault(batch.track, []).append(np.array(batch.samples))
            self.lengths[batch.track] = batch.position + len(batch.samples)
            self.batches += 1

    def audio(self, track: Track) -> NDArray[np.int16]:
        parts = self.parts.get(track)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
