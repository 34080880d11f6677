"""One claimed stream rebuilt from its entries: a WAV file per track and ``stream.json``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import soundfile
from numpy.typing import NDArray

from receiver.consume.levels import Level
from receiver.consume.replies import Fields
from receiver.events import TRACKS, Track
from receiver.sinks.redis.wire import read_audio, read_control, stream_keys
from receiver.sinks.wav import write_json_atomic
from receiver.text import shorten

# A position this far past a track's end is a corrupt entry, not a gap: refuse to fill it.
_MAX_HOLE_S = 24 * 3600
_ZERO_BLOCK = 65_536


class TrackWriter:
    """One track's WAV file placed by position: holes become zeros, repeats are written once."""

    def __init__(self, path: Path | None, rate: int, level: Level | None) -> None:
        self.path = path
        self.rate = rate
        self.level = level
        self.file = (
            soundfile.SoundFile(path, "w", rate, 1, subtype="PCM_16", format="WAV")
            if path is not None
            else None
        )
        self.samples = 0
        self.missing = 0
        self.repeated = 0

    def place(self, position: int, samples: NDArray[np.int16]) -> None:
        """Put ``samples`` at ``position``, filling a hole before it with zeros."""
        if position > self.samples:
            hole = position - self.samples
            if hole > _MAX_HOLE_S * self.rate:
                raise ValueError(f"position {position} is {hole} samples past the track's end")
            self._zeros(hole)
            self.missing += hole
        elif position < self.samples:
            overlap = min(self.samples - position, len(samples))
            self.repeated += overlap
            position, samples = position + overlap, samples[overlap:]
        if len(samples):
            if self.file is not None:
                self.file.write(samples)
            if self.level is not None:
                self.level.add(position, samples)
            self.samples += len(samples)

    def pad_to(self, length: int) -> None:
        """Zeros up to ``length`` samples: what the receiver recorded but never arrived here."""
        if length > self.samples:
            hole = length - self.samples
            self._zeros(hole)
            self.missing += hole

    def close(self) -> None:
        if self.level is not None:
            self.level.flush()
        if self.file is not None:
            self.file.close()

    def _zeros(self, count: int) -> None:
        if self.file is not None:
            for start in range(0, count, _ZERO_BLOCK):
                self.file.write(np.zeros(min(_ZERO_BLOCK, count - start), dtype=np.int16))
        self.samples += count


class StreamJob:
    """One claimed stream: its keys, how far each has been read, its track files."""

    def __init__(
        self,
        *,
        control_id: str,
        stream_id: str,
        start: dict[str, Any],
        rate: int,
        prefix: str,
        output_dir: Path | None,
        out: TextIO | None,
    ) -> None:
        self.control_id = control_id
        self.stream_id = stream_id
        self.start = start
        self.rate = rate
        self.keys = stream_keys(prefix, stream_id)
        self.last_ids = dict.fromkeys(self.keys.values(), "0-0")
        self.directory = output_dir / stream_id if output_dir is not None else None
        if self.directory is not None:
            # A stream claimed again (its worker died) is rebuilt from its first entry.
            self.directory.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.tracks: dict[Track, TrackWriter] = {}
        self.events: list[dict[str, Any]] = []
        # What the receiver dropped (a Redis outage past its queue bound), per gap entry.
        self.outages: list[dict[str, Any]] = []
        self.stop: dict[str, Any] | None = None
        self.seen_at = time.monotonic()

    def on_entry(self, kind: str, fields: Fields) -> None:
        """An entry of the ``events`` key or of a track's key; ``WireError`` if malformed."""
        self.seen_at = time.monotonic()
        if kind == "events":
            self._on_event(fields)
        elif kind in TRACKS:
            self._on_audio(kind, fields)

    def finish(self, reason: str | None = None) -> dict[str, Any]:
        """Close every file and write ``stream.json``; returns that record."""
        stop = self.stop or {}
        summary_tracks: dict[str, Any] = stop.get("tracks") or {}
        for track in TRACKS:
            length = (summary_tracks.get(track) or {}).get("samples")
            if isinstance(length, int) and length > 0:
                self._track(track, self.rate).pad_to(length)
        for writer in self.tracks.values():
            writer.close()
        redis_part = stop.get("redis") or {}
        missing = sum(w.missing for w in self.tracks.values())
        if reason is None and self.stop is None:
            reason = "no stop entry"
        if reason is None and self.outages:
            lost = sum(
                span["samples"]
                for outage in self.outages
                for spans in outage.get("tracks", {}).values()
                for span in spans
            )
            reason = f"the receiver dropped {lost} samples while Redis was unreachable or slow"
        if reason is None and not redis_part.get("complete", False):
            reason = f"the receiver's Redis copy is incomplete: {redis_part.get('error')}"
        if reason is None and missing:
            reason = f"{missing} samples never arrived (zeros in their place)"
        record: dict[str, Any] = {
            "status": "complete" if reason is None else "incomplete",
            "reason": reason,
            "stream_id": self.stream_id,
            "control_id": self.control_id,
            "tracks": {
                track: {
                    "file": w.path.name if w.path else None,
                    "samples": w.samples,
                    "sample_rate_hz": w.rate,
                    "missing_samples": w.missing,
                    "repeated_samples": w.repeated,
                }
                for track, w in self.tracks.items()
            },
            "outages": self.outages,
            "events": self.events,
            "start": self.start,
            "stop": self.stop,
        }
        if self.directory is not None:
            write_json_atomic(self.directory / "stream.json", record)
        return record

    def abandon(self) -> None:
        """Close the files as they are (the stream stays pending for a later claim)."""
        for writer in self.tracks.values():
            writer.close()

    def _on_event(self, fields: Fields) -> None:
        entry = read_control(fields)
        if entry.kind == "start":
            return
        data = entry.data
        if entry.kind == "stop":
            self.stop = data
            return
        if entry.kind == "gap":
            self.outages.append(data)
            if self.out is not None:
                print(f"{self.stream_id} gap      {data.get('tracks')}", file=self.out, flush=True)
            return
        data["type"] = entry.kind
        self.events.append(data)
        if self.out is not None:
            what = data.get("digit") if entry.kind == "dtmf" else data.get("name")
            shown = shorten(str(what), 32)
            at_s = float(data.get("at_ms") or 0) / 1000
            line = f"{self.stream_id} {entry.kind:<8} {at_s:8.1f} s  {shown}"
            print(line, file=self.out, flush=True)

    def _on_audio(self, track: Track, fields: Fields) -> None:
        entry = read_audio(fields, default_rate_hz=self.rate)
        self._track(track, entry.rate_hz).place(entry.position, entry.samples)

    def _track(self, track: Track, rate: int) -> TrackWriter:
        writer = self.tracks.get(track)
        if writer is None:
            path = self.directory / f"{track}.wav" if self.directory is not None else None
            label = f"{self.stream_id} {track:<8}"
            level = Level(label, rate, self.out) if self.out is not None else None
            writer = self.tracks[track] = TrackWriter(path, rate, level)
        return writer
