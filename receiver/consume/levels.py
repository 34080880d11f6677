"""``--levels``: a track's RMS and peak over each second of audio."""

from __future__ import annotations

import math
from typing import TextIO

import numpy as np
from numpy.typing import NDArray


def dbfs(value: float) -> float:
    """A 16-bit amplitude in dB relative to full scale (-99 for silence)."""
    return 20 * math.log10(value / 32768) if value > 0 else -99.0


class Level:
    """Sums one track's audio and prints a line each time a second of it is complete."""

    def __init__(self, label: str, rate: int, out: TextIO) -> None:
        self.label, self.rate, self.out = label, rate, out
        self.squares, self.peak, self.count, self.at = 0.0, 0, 0, 0

    def add(self, position: int, samples: NDArray[np.int16]) -> None:
        if not self.count:
            self.at = position
        wide = samples.astype(np.int64)
        self.squares += float(np.dot(wide, wide))
        self.peak = max(self.peak, int(np.abs(wide).max(initial=0)))
        self.count += len(samples)
        if self.count >= self.rate:
            self.flush()

    def flush(self) -> None:
        if not self.count:
            return
        rms = math.sqrt(self.squares / self.count)
        print(
            f"{self.label} {self.at / self.rate:8.1f} s  rms {dbfs(rms):6.1f} dBFS"
            f"  peak {dbfs(self.peak):6.1f} dBFS",
            file=self.out,
            flush=True,
        )
        self.squares, self.peak, self.count = 0.0, 0, 0
