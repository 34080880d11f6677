"""Audio for and from the tests: sox as the independent codec reference, WAVs read back."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from numpy.typing import NDArray


def run(*argv: str | Path) -> None:
    """Run a tool (sox, espeak-ng) and fail the test with its stderr if it fails."""
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{argv[0]} failed: {result.stderr}"


def sox_decode(raw: Path, kind: str, rate: int = 8000) -> NDArray[np.int16]:
    """Decode raw G.711 (``ul``/``al``) with sox: the independent reference decoder."""
    out = raw.with_suffix(".s16")
    run(
        "sox",
        "-t",
        kind,
        "-r",
        rate,
        "-c",
        "1",
        raw,
        "-t",
        "s16",
        "-e",
        "signed-integer",
        "-L",
        out,
    )
    return np.frombuffer(out.read_bytes(), dtype="<i2").astype(np.int16)


def sox_encode(wav: Path, kind: str, out: Path) -> bytes:
    """Encode a WAV to raw ``ul``/``al``/``s16`` with sox: the outside encoder.

    ``-D``: sox dithers by default when it lowers precision (16 bits to G.711's 13-14), which
    would make its output random rather than G.711's one answer per sample.
    """
    extra = ["-e", "signed-integer", "-L"] if kind == "s16" else []
    run("sox", "-D", wav, "-t", kind, *extra, out)
    return out.read_bytes()


def read_wav(path: Path) -> tuple[NDArray[np.int16], int]:
    """A recorded WAV as int16 samples and its rate, read with soundfile."""
    data, rate = soundfile.read(path, dtype="int16")
    return np.asarray(data, dtype=np.int16), int(rate)


@dataclass(frozen=True)
class Speech:
    """Real speech for one track at several rates, made by espeak-ng and resampled by sox."""

    wav: dict[int, Path]

    def samples(self, rate: int) -> NDArray[np.int16]:
        data, file_rate = soundfile.read(self.wav[rate], dtype="int16")
        assert file_rate == rate
        return np.asarray(data, dtype=np.int16)
