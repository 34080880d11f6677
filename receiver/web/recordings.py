"""Finished streams as the web page lists them: an index of the ``stream.json`` files.

The scan runs in a thread (``asyncio.to_thread``) and at most once per ``refresh_s``, however
many requests ask: concurrent requests share one scan. A directory whose ``stream.json`` has not
changed (same mtime and size) is not read again, and only the newest ``max_listed`` directories
(by the mtime of their ``stream.json``) are read at all, so a large recordings directory costs
one ``scandir`` and one ``stat`` per entry a refresh.

Files are served only by stream directory name and file name, each matched against a strict
pattern and resolved inside the recordings directory (``resolve_file``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from receiver.sinks.wav import RECORD_NAME, STREAM_DIR_PATTERN

logger = logging.getLogger("receiver.web")

DIR_PATTERN = STREAM_DIR_PATTERN
FILE_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}\.(wav|flac|json)")
_AUDIO_SUFFIXES = (".wav", ".flac")
_MAX_RECORD_BYTES = 4 * 1024 * 1024
_MAX_SHOWN_PARAM_CHARS = 200
_MAX_SHOWN_PARAMS = 20


@dataclass(frozen=True, slots=True)
class Listed:
    """What the list shows of one finished stream (and what a search looks at)."""

    directory: str
    mtime_ns: int
    size: int
    summary: dict[str, Any]
    haystack: str  # sid, call sid, path and parameters, lower case, for a search


def summarise(directory: str, record: dict[str, Any]) -> dict[str, Any]:
    """The list's row of a stream: ids, parameters, times, how it ended, its tracks."""
    tracks = record.get("tracks") if isinstance(record.get("tracks"), dict) else {}
    params = record.get("custom_parameters")
    params = params if isinstance(params, dict) else {}
    end = record.get("end") if isinstance(record.get("end"), dict) else {}
    return {
        "directory": directory,
        "stream_sid": _text(record.get("stream_sid")),
        "call_sid": _text(record.get("call_sid")),
        "path": _text(record.get("path")),
        "status": _text(record.get("status")),
        "codec": _text(record.get("codec")),
        "started_at": _text(record.get("started_at")),
        "ended_at": _text(record.get("ended_at")),
        "end": _text((end or {}).get("kind")),
        "duration_s": max(
            (
                float(t.get("duration_s") or 0)
                for t in (tracks or {}).values()
                if isinstance(t, dict)
            ),
            default=0.0,
        ),
        "tracks": sorted(str(t) for t in (tracks or {})),
        "custom_parameters": shown_parameters(params),
        "dtmf": len(record.get("dtmf") or []),
        "uploaded": isinstance(record.get("upload"), dict)
        and record["upload"].get("status") == "uploaded",
    }


def shown_parameters(params: dict[Any, Any]) -> dict[str, str]:
    """What the page shows of a stream's custom parameters: the first 20, each cut short."""
    return {
        _text(k)[:_MAX_SHOWN_PARAM_CHARS]: _text(v)[:_MAX_SHOWN_PARAM_CHARS]
        for k, v in list(params.items())[:_MAX_SHOWN_PARAMS]
    }


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def read_record(path: Path) -> dict[str, Any] | None:
    """A ``stream.json`` as a dict, or None when it is missing, too large or not an object."""
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_RECORD_BYTES + 1)
    except OSError:
        return None
    if len(data) > _MAX_RECORD_BYTES:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class RecordingsIndex:
    """The finished streams under ``root``, newest first; see the module docstring."""

    def __init__(self, root: Path, *, max_listed: int, refresh_s: float = 2.0) -> None:
        self.root = root
        self.max_listed = max_listed
        self.refresh_s = refresh_s
        self.entries: list[Listed] = []
        self.not_listed = 0  # directories past max_listed at the last scan
        self.scans = 0
        self._cache: dict[str, Listed] = {}
        self._scanned_at = -math.inf
        self._scan: asyncio.Task[None] | None = None
        self._warned_limit = False

    async def listing(self) -> list[Listed]:
        """The entries, rescanned when older than ``refresh_s`` (one scan at a time)."""
        if time.monotonic() - self._scanned_at >= self.refresh_s:
            if self._scan is None:
                self._scan = asyncio.create_task(self._rescan())
            scan = self._scan
            try:
                await asyncio.shield(scan)
            finally:
                if scan.done() and self._scan is scan:
                    self._scan = None
        return self.entries

    async def search(
        self, *, text: str = "", date: str = "", offset: int, limit: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """Entries whose ids, path or parameters contain ``text`` and that started on ``date``
        (a ``YYYY-MM-DD`` prefix of ``started_at``); the total and one page of them."""
        needle = text.strip().lower()
        matched = [
            e
            for e in await self.listing()
            if (not needle or needle in e.haystack)
            and (not date or e.summary["started_at"].startswith(date))
        ]
        return len(matched), [e.summary for e in matched[offset : offset + limit]]

    async def _rescan(self) -> None:
        entries, not_listed = await asyncio.to_thread(self._scan_now)
        self.entries, self.not_listed = entries, not_listed
        self._scanned_at = time.monotonic()
        self.scans += 1
        if not_listed and not self._warned_limit:
            self._warned_limit = True
            logger.warning(
                "web page: %d stream directories past RECEIVER_UI_MAX_LISTED=%d are not listed",
                not_listed,
                self.max_listed,
            )

    def _scan_now(self) -> tuple[list[Listed], int]:
        """In a thread: stat every stream.json, read the new or changed ones of the newest."""
        found: list[tuple[int, int, str]] = []
        try:
            with os.scandir(self.root) as it:
                for entry in it:
                    if not DIR_PATTERN.fullmatch(entry.name) or not entry.is_dir():
                        continue
                    try:
                        st = os.stat(os.path.join(entry.path, RECORD_NAME))
                    except OSError:
                        continue
                    found.append((st.st_mtime_ns, st.st_size, entry.name))
        except OSError as exc:
            logger.warning("web page: cannot list %s: %s", self.root, exc.strerror or exc)
            return [], 0
        found.sort(reverse=True)
        kept = found[: self.max_listed]
        cache: dict[str, Listed] = {}
        for mtime_ns, size, name in kept:
            old = self._cache.get(name)
            if old is not None and old.mtime_ns == mtime_ns and old.size == size:
                cache[name] = old
                continue
            record = read_record(self.root / name / RECORD_NAME)
            if record is None:
                continue
            summary = summarise(name, record)
            haystack = " ".join(
                [summary["stream_sid"], summary["call_sid"], summary["path"], name]
                + [f"{k}={v}" for k, v in summary["custom_parameters"].items()]
            ).lower()
            cache[name] = Listed(name, mtime_ns, size, summary, haystack)
        self._cache = cache
        entries = sorted(
            cache.values(), key=lambda e: (e.summary["started_at"], e.mtime_ns), reverse=True
        )
        return entries, len(found) - len(kept)


def resolve_file(root: Path, directory: str, name: str) -> Path | None:
    """``root/directory/name`` when both names match the strict patterns and the resolved path
    is a regular file inside ``root``; None otherwise (the caller answers 404)."""
    if not DIR_PATTERN.fullmatch(directory) or not FILE_PATTERN.fullmatch(name):
        return None
    base = root.resolve()
    try:
        path = (base / directory / name).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(base) or path.parent.parent != base or not path.is_file():
        return None
    return path


def resolve_dir(root: Path, directory: str) -> Path | None:
    """``root/directory`` when the name matches the pattern and it holds a ``stream.json``."""
    if not DIR_PATTERN.fullmatch(directory):
        return None
    found = resolve_file(root, directory, RECORD_NAME)
    return found.parent if found is not None else None


def envelope(path: Path, *, points: int, total_samples: int) -> dict[str, list[float]]:
    """A min/max envelope of a mono audio file on a timeline of ``total_samples`` samples cut
    into ``points`` buckets (the file may be shorter: the rest stays empty), and the runs of
    exact digital silence (how gaps are filled) at least 20 ms long, as bucket ranges.

    Reads the file a block at a time: memory is one block, whatever the file's length.
    """
    bucket = max(1, math.ceil(total_samples / points))
    lows: list[float] = []
    highs: list[float] = []
    silent: list[float] = []  # [start_s, end_s, start_s, end_s, ...]
    with soundfile.SoundFile(path) as file:
        rate = file.samplerate
        min_run = max(1, rate // 50)
        block = bucket * max(1, 65_536 // bucket)
        position = 0
        run_start: int | None = None
        for data in file.blocks(blocksize=block, dtype="int16", always_2d=True):
            mono = data[:, 0]
            whole = len(mono) // bucket * bucket
            if whole:
                shaped = mono[:whole].reshape(-1, bucket)
                lows.extend((shaped.min(axis=1) / 32768.0).round(4).tolist())
                highs.extend((shaped.max(axis=1) / 32768.0).round(4).tolist())
            if whole < len(mono):  # only the file's last block ends mid-bucket
                rest = mono[whole:]
                lows.append(round(float(rest.min()) / 32768.0, 4))
                highs.append(round(float(rest.max()) / 32768.0, 4))
            # Runs of zeros: where the zero/non-zero state changes.
            zero = mono == 0
            edges = np.flatnonzero(np.diff(zero.astype(np.int8))) + 1
            starts = [0, *edges.tolist()]
            for s in starts:
                if zero[s]:
                    if run_start is None:
                        run_start = position + s
                elif run_start is not None:
                    # Bounded (the first `points` runs are marked), but the envelope goes on.
                    if position + s - run_start >= min_run and len(silent) < 2 * points:
                        silent += [run_start / rate, (position + s) / rate]
                    run_start = None
            position += len(mono)
        if run_start is not None and position - run_start >= min_run and len(silent) < 2 * points:
            silent += [run_start / rate, position / rate]
    return {"min": lows[:points], "max": highs[:points], "silence_s": silent[: 2 * points]}


class Waveforms:
    """Envelopes of a stream's tracks, computed in a thread and kept for a few streams."""

    def __init__(self, *, points: int = 1000, cached_streams: int = 16) -> None:
        self.points = points
        self.cached_streams = cached_streams
        self._cache: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()

    async def of(self, directory: Path, record: dict[str, Any]) -> dict[str, Any]:
        """``{"duration_s", "points", "tracks": {track: envelope}}`` on one shared timeline."""
        key = (str(directory), (directory / RECORD_NAME).stat().st_mtime_ns)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        result = await asyncio.to_thread(self._compute, directory, record)
        if record.get("status") == "recording":
            return result  # its files still grow: computed afresh each time
        self._cache[key] = result
        while len(self._cache) > self.cached_streams:
            self._cache.popitem(last=False)
        return result

    def _compute(self, directory: Path, record: dict[str, Any]) -> dict[str, Any]:
        files = record.get("files") if isinstance(record.get("files"), dict) else {}
        audio: dict[str, Path] = {}
        for track, name in (files or {}).items():
            if track == "stereo" or not isinstance(name, str):
                continue
            path = resolve_file(directory.parent, directory.name, name)
            if path is not None and path.suffix in _AUDIO_SUFFIXES:
                audio[str(track)] = path
        lengths: dict[str, int] = {}
        rate = 8000
        for track, path in audio.items():
            info = soundfile.info(str(path))
            lengths[track], rate = int(info.frames), int(info.samplerate)
        total = max(lengths.values(), default=0)
        tracks = {
            track: envelope(path, points=self.points, total_samples=max(total, 1))
            for track, path in audio.items()
        }
        bucket = max(1, math.ceil(total / self.points)) if total else 1
        return {
            "duration_s": total / rate if rate else 0.0,
            "bucket_s": bucket / rate,
            "points": self.points,
            "tracks": tracks,
        }
