"""Finding and repairing streams that a crash interrupted.

A live stream's wav sink holds an ``flock`` on ``<recordings>/.in-progress/<dir>``. A marker
whose lock can be taken belongs to a stream whose process died. Its WAV headers are at most
one batch behind (the sink rewrites them after every batch), so strict readers open them as they
are; ``repair`` makes them exact (data that reached the disk after the last header update) and
marks ``stream.json`` ``"interrupted"``. A stream whose final ``stream.json`` could not be written
(a full disk) leaves its marker unlocked too, and is finished the same way.

Repair never stops at one bad file: each problem (a WAV that is not RIFF, a write that fails)
is one line in ``StreamRepair.problems``; a stream whose ``stream.json`` could not be written
keeps its marker, so that the next ``receiver repair`` tries again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from receiver.sinks.wav import IN_PROGRESS_DIR, RECORD_NAME, write_json_atomic

_HEADER_BYTES = 4096


@dataclass(frozen=True, slots=True)
class WavRepair:
    """What ``repair_wav`` found: the samples the file holds and whether its header changed."""

    path: Path
    samples: int
    changed: bool


@dataclass(frozen=True, slots=True)
class StreamRepair:
    """One interrupted stream's directory and what was done to its files."""

    directory: Path
    wavs: list[WavRepair] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    finished: bool = True  # stream.json written: the marker is removed


@contextlib.contextmanager
def _abandoned(marker: Path) -> Iterator[bool]:
    """True (while held) when nobody holds ``marker``'s lock: its stream's process is gone."""
    try:
        fd = os.open(marker, os.O_RDONLY)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def find_interrupted(recordings_dir: Path) -> list[Path]:
    """Stream directories whose marker is left but unlocked: interrupted by a crash."""
    markers = recordings_dir / IN_PROGRESS_DIR
    if not markers.is_dir():
        return []
    found = []
    for marker in sorted(markers.iterdir()):
        with _abandoned(marker) as abandoned:
            if abandoned:
                found.append(recordings_dir / marker.name)
    return found


def repair(recordings_dir: Path) -> list[StreamRepair]:
    """Repair every interrupted stream under ``recordings_dir``; live streams are left alone."""
    repaired = []
    markers = recordings_dir / IN_PROGRESS_DIR
    for directory in find_interrupted(recordings_dir):
        marker = markers / directory.name
        with _abandoned(marker) as abandoned:
            if not abandoned:  # a server took it up meanwhile
                continue
            done = True
            if directory.is_dir():
                stream = repair_stream(directory)
                repaired.append(stream)
                done = stream.finished
            if done:
                marker.unlink(missing_ok=True)
    return repaired


def repair_stream(directory: Path) -> StreamRepair:
    """Fix the stream's WAV headers and mark its ``stream.json`` interrupted.

    Problems (a file that cannot be read or written) are listed, never raised.
    """
    wavs: list[WavRepair] = []
    problems: list[str] = []
    for leftover in directory.glob("*.tmp"):  # a write a crash or a full disk cut short
        with contextlib.suppress(OSError):
            leftover.unlink()
    for path in sorted(directory.glob("*.wav")):
        try:
            wavs.append(repair_wav(path))
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: {_describe(exc)}")
    record_path = directory / RECORD_NAME
    record: dict[str, Any] = {}
    try:
        loaded = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        loaded = {}
    except (OSError, ValueError) as exc:
        problems.append(f"{RECORD_NAME}: unreadable, written anew ({_describe(exc)})")
        loaded = {}
    if isinstance(loaded, dict):
        record = loaded
    media_format = record.get("media_format")
    rate = media_format.get("sample_rate_hz") if isinstance(media_format, dict) else None
    record["status"] = "interrupted"
    record["end"] = {
        "kind": "interrupted",
        "close_code": None,
        "reason": "the receiver stopped without finishing this stream (crash or kill)",
    }
    record["repaired_at"] = datetime.now(UTC).isoformat()
    tracks = record.get("tracks")
    if not isinstance(tracks, dict):
        tracks = record["tracks"] = {}
    for wav in wavs:
        stats = tracks.setdefault(wav.path.stem, {})
        if not isinstance(stats, dict):
            stats = tracks[wav.path.stem] = {}
        stats["samples"] = wav.samples
        if isinstance(rate, int) and rate > 0:
            stats["duration_s"] = round(wav.samples / rate, 6)
    record["files"] = {wav.path.stem: wav.path.name for wav in wavs}
    try:
        write_json_atomic(record_path, record)
    except (OSError, ValueError, RecursionError) as exc:
        problems.append(f"{RECORD_NAME}: not written ({_describe(exc)}); run repair again")
        return StreamRepair(directory, wavs, problems, finished=False)
    return StreamRepair(directory, wavs, problems)


def _describe(exc: BaseException) -> str:
    """One line for a problem: the OS's words when there are some."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def repair_wav(path: Path) -> WavRepair:
    """Make a RIFF/WAVE file's sizes match the whole samples on disk (cut a partial one).

    Raises ``ValueError`` for a file that is not RIFF/WAVE or has no data chunk in its first
    4 KiB.
    """
    with path.open("r+b") as f:
        header = f.read(_HEADER_BYTES)
        if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            raise ValueError(f"{path.name} is not a RIFF/WAVE file")
        block_align, fact_at, data_at, stated = 0, None, None, 0
        position = 12
        while position + 8 <= len(header):
            chunk, size = header[position : position + 4], _u32(header, position + 4)
            if chunk == b"fmt ":
                block_align = struct.unpack_from("<H", header, position + 8 + 12)[0]
            elif chunk == b"fact":
                fact_at = position + 8
            elif chunk == b"data":
                data_at, stated = position + 8, size
                break
            position += 8 + size + (size & 1)
        if data_at is None or block_align == 0:
            raise ValueError(f"{path.name} has no fmt and data chunk in its header")
        on_disk = os.fstat(f.fileno()).st_size - data_at
        data_bytes = on_disk - on_disk % block_align
        samples = data_bytes // block_align
        riff_size = data_at + data_bytes - 8
        changed = stated != data_bytes or _u32(header, 4) != riff_size
        if changed or on_disk != data_bytes:
            f.truncate(data_at + data_bytes)
            _put_u32(f, 4, riff_size)
            _put_u32(f, data_at - 4, data_bytes)
            if fact_at is not None:
                _put_u32(f, fact_at, samples)
        return WavRepair(path, samples, changed)


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def _put_u32(f: Any, offset: int, value: int) -> None:
    f.seek(offset)
    f.write(struct.pack("<I", value))
