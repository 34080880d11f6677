"""``receiver consume``: the reference consumer of the ``redis`` sink.

Each worker of a consumer group claims streams from ``P:control`` (Redis hands each ``start``
entry to one worker of the group), follows the claimed stream's own keys with ``XREAD`` and
rebuilds every track as a WAV file, sample-exact: each audio entry says where its samples go, so
a missing stretch (trimmed, or dropped by a lagging receiver) becomes zeros of its length and a
repeated one is written once. The files are finished on the stream's ``stop`` entry, and only
then is its ``start`` acknowledged: a worker that dies leaves it pending, another worker claims
it after ``--claim-idle-s`` and rebuilds the stream from its first entry. ``--levels`` prints
each track's level once a second, instead of the files or beside them.

The entry format is in ``docs/redis.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import numpy as np
import redis
import soundfile
from numpy.typing import NDArray
from redis.typing import KeyT, StreamIdT

from receiver.events import TRACKS, Track
from receiver.exceptions import ConfigError
from receiver.sinks.redis_stream import DEFAULT_PREFIX, DEFAULT_URL, control_key, stream_keys
from receiver.sinks.wav import write_json_atomic

logger = logging.getLogger("receiver.consume")

DEFAULT_GROUP = "receiver-consume"
# What the redis sink makes: safe_dirname(sid) "." 8 hex digits. Anything else in a start entry
# was not written by a receiver, and never becomes a directory name.
_STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\.[0-9a-f]{8}")
# A position this far past a track's end is a corrupt entry, not a gap: refuse to fill it.
_MAX_HOLE_S = 24 * 3600
_READ_COUNT = 512
_ZERO_BLOCK = 65_536

Fields = dict[bytes, bytes]
Entry = tuple[str, Fields]


@dataclass(frozen=True, slots=True)
class ConsumeOptions:
    """What one worker does; see ``receiver consume --help``."""

    url: str = field(repr=False)  # may hold a password
    prefix: str = DEFAULT_PREFIX
    group: str = DEFAULT_GROUP
    consumer: str = "consumer"
    output_dir: Path | None = None
    levels: bool = False
    count: int = 0
    block_ms: int = 1000
    claim_idle_s: float = 60.0
    stream_timeout_s: float = 120.0
    new_only: bool = False


def _text(value: object) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _items(response: Any) -> Iterator[tuple[str, list[Entry]]]:
    """``(key, [(id, fields)...])`` from an XREAD/XREADGROUP reply, RESP2 list or RESP3 dict."""
    if not response:
        return
    pairs = response.items() if isinstance(response, dict) else response
    for key, entries in pairs:
        if (
            entries
            and isinstance(entries[0], list)
            and entries[0]
            and isinstance(entries[0][0], (list, tuple))
        ):
            entries = entries[0]  # RESP3 wraps each key's entries once more
        yield _text(key), [(_text(i), f) for i, f in entries if f is not None]


def _dbfs(value: float) -> float:
    return 20 * math.log10(value / 32768) if value > 0 else -99.0


class _Level:
    """A track's RMS and peak over each second of audio, printed as it completes."""

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
            f"{self.label} {self.at / self.rate:8.1f} s  rms {_dbfs(rms):6.1f} dBFS"
            f"  peak {_dbfs(self.peak):6.1f} dBFS",
            file=self.out,
            flush=True,
        )
        self.squares, self.peak, self.count = 0.0, 0, 0


class TrackWriter:
    """One track's WAV file placed by position: holes become zeros, repeats are written once."""

    def __init__(self, path: Path | None, rate: int, level: _Level | None) -> None:
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
        self.stop: dict[str, Any] | None = None
        self.seen_at = time.monotonic()

    def on_entry(self, kind: str, fields: Fields) -> None:
        """An entry of the ``events`` key or of a track's key."""
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
        kind = _text(fields.get(b"type", b""))
        if kind not in ("dtmf", "mark", "stop"):
            return
        data = json.loads(fields.get(b"data", b"{}"))
        if kind == "stop":
            self.stop = data
            return
        data["type"] = kind
        self.events.append(data)
        if self.out is not None:
            what = data.get("digit") if kind == "dtmf" else data.get("name")
            shown = str(what).encode("unicode_escape").decode("ascii")[:32]
            at_s = float(data.get("at_ms") or 0) / 1000
            print(f"{self.stream_id} {kind:<8} {at_s:8.1f} s  {shown}", file=self.out, flush=True)

    def _on_audio(self, track: Track, fields: Fields) -> None:
        position = int(fields[b"position"])
        rate = int(fields.get(b"rate", b"0")) or self.rate
        samples = np.frombuffer(fields[b"samples"], dtype="<i2").astype(np.int16)
        if position < 0:
            raise ValueError(f"negative position {position}")
        self._track(track, rate).place(position, samples)

    def _track(self, track: Track, rate: int) -> TrackWriter:
        writer = self.tracks.get(track)
        if writer is None:
            path = self.directory / f"{track}.wav" if self.directory is not None else None
            label = f"{self.stream_id} {track:<8}"
            level = _Level(label, rate, self.out) if self.out is not None else None
            writer = self.tracks[track] = TrackWriter(path, rate, level)
        return writer


class Consumer:
    """One worker of a consumer group: claims streams, rebuilds them, acknowledges them."""

    def __init__(
        self, client: redis.Redis, options: ConsumeOptions, *, out: TextIO = sys.stdout
    ) -> None:
        self.client = client
        self.options = options
        self.out = out
        self.control = control_key(options.prefix)
        self.jobs: dict[str, StreamJob] = {}
        self.finished = 0
        self.stopping = False
        self._last_claim = 0.0
        self._last_beat = time.monotonic()

    def run(self) -> int:
        """Work until ``count`` streams are finished or ``stop()``; 0 on a clean stop."""
        ready = False
        while not self.stopping and not self._enough():
            try:
                if not ready:
                    self._create_group()
                    logger.info(
                        "working as %s of group %s on %s",
                        self.options.consumer,
                        self.options.group,
                        self.control,
                    )
                    self._resume_own()
                    ready = True
                self.step()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                logger.warning("Redis unreachable (%s); retrying in 1 s", exc)
                time.sleep(1.0)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The control stream or the group was deleted (FLUSHALL, DEL): start again.
                logger.warning("consumer group %s is gone; creating it again", self.options.group)
                self._create_group()
        for job in self.jobs.values():
            job.abandon()
        if self.jobs:
            logger.info("%d stream(s) left pending for a later claim", len(self.jobs))
        return 0

    def stop(self) -> None:
        """Stop after the current read (signal handlers call this)."""
        self.stopping = True

    def step(self) -> None:
        """One round: claim abandoned streams, read new ones, follow the claimed ones."""
        now = time.monotonic()
        if now - self._last_claim >= self.options.claim_idle_s / 2:
            self._last_claim = now
            self._autoclaim()
        if now - self._last_beat >= self.options.claim_idle_s / 3:
            self._last_beat = now
            self._heartbeat()
        reply = self.client.xreadgroup(
            self.options.group,
            self.options.consumer,
            {self.control: ">"},
            count=16,
            block=None if self.jobs else self.options.block_ms,
        )
        for _, entries in _items(reply):
            for entry_id, fields in entries:
                self._on_control(entry_id, fields)
        if self.jobs:
            self._follow(block_ms=min(self.options.block_ms, 200))
        self._expire_stale()

    def _enough(self) -> bool:
        return bool(self.options.count) and self.finished >= self.options.count

    def _create_group(self) -> None:
        try:
            self.client.xgroup_create(
                self.control,
                self.options.group,
                id="$" if self.options.new_only else "0",
                mkstream=True,
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _resume_own(self) -> None:
        """Streams this consumer name had claimed before a restart: rebuild them."""
        after = "0"
        while True:
            reply = self.client.xreadgroup(
                self.options.group, self.options.consumer, {self.control: after}, count=64
            )
            entries = [e for _, batch in _items(reply) for e in batch]
            if not entries:
                return
            for entry_id, fields in entries:
                self._on_control(entry_id, fields)
            after = entries[-1][0]

    def _autoclaim(self) -> None:
        """Take over streams whose worker has not shown life for ``claim_idle_s``."""
        cursor = "0-0"
        for _ in range(16):
            # Any: redis-py before 8 types replies as Awaitable | Any.
            reply: Any = self.client.xautoclaim(
                self.control,
                self.options.group,
                self.options.consumer,
                min_idle_time=int(self.options.claim_idle_s * 1000),
                start_id=cursor,
                count=16,
            )
            cursor = _text(reply[0])
            for entry_id, fields in reply[1]:
                if fields is not None and _text(entry_id) not in self.jobs:
                    logger.info("claimed an abandoned entry %s", _text(entry_id))
                    self._on_control(_text(entry_id), fields)
            if cursor == "0-0":
                return

    def _heartbeat(self) -> None:
        """Reset the idle time of the streams we work on, so nobody claims them from us."""
        if not self.jobs:
            return
        pending: Any = self.client.xpending_range(
            self.control,
            self.options.group,
            min="-",
            max="+",
            count=len(self.jobs) + 64,
            consumername=self.options.consumer,
        )
        owned = {_text(p["message_id"]) for p in pending}
        for entry_id in list(self.jobs):
            if entry_id not in owned:
                job = self.jobs.pop(entry_id)
                logger.warning("stream %s was claimed by another worker", job.stream_id)
                job.abandon()
        if self.jobs:
            self.client.xclaim(
                self.control,
                self.options.group,
                self.options.consumer,
                min_idle_time=0,
                message_ids=list(self.jobs),
                justid=True,
            )

    def _on_control(self, entry_id: str, fields: Fields) -> None:
        if entry_id in self.jobs:
            return  # delivered again (a retried resume, a claim of our own entry)
        if fields.get(b"type") != b"start":
            # dtmf, mark and stop reach the stream's worker through its own events key.
            self.client.xack(self.control, self.options.group, entry_id)
            return
        stream_id = _text(fields.get(b"stream_id", b""))
        if not _STREAM_ID.fullmatch(stream_id):
            logger.warning("skipping start entry %s: not a receiver stream id", entry_id)
            self.client.xack(self.control, self.options.group, entry_id)
            return
        try:
            start = json.loads(fields.get(b"data", b"{}"))
            rate = int(fields.get(b"rate", b"8000"))
        except ValueError:
            logger.warning("skipping start entry %s: unreadable data or rate", entry_id)
            self.client.xack(self.control, self.options.group, entry_id)
            return
        job = StreamJob(
            control_id=entry_id,
            stream_id=stream_id,
            start=start,
            rate=rate,
            prefix=self.options.prefix,
            output_dir=self.options.output_dir,
            out=self.out if self.options.levels else None,
        )
        self.jobs[entry_id] = job
        logger.info("following stream %s", stream_id)

    def _follow(self, *, block_ms: int) -> None:
        by_key = {key: (job, kind) for job in self.jobs.values() for kind, key in job.keys.items()}
        streams: dict[KeyT, StreamIdT] = {
            key: job.last_ids[key] for key, (job, _) in by_key.items()
        }
        reply = self.client.xread(streams, count=_READ_COUNT, block=block_ms)
        for key, entries in _items(reply):
            job, kind = by_key[key]
            self._apply(job, kind, key, entries)
        for job in [j for j in self.jobs.values() if j.stop is not None]:
            self._drain(job)
            self._finish(job)

    def _apply(self, job: StreamJob, kind: str, key: str, entries: list[Entry]) -> None:
        for entry_id, fields in entries:
            try:
                job.on_entry(kind, fields)
            except (KeyError, ValueError) as exc:
                logger.warning("stream %s: bad entry %s skipped: %s", job.stream_id, entry_id, exc)
            job.last_ids[key] = entry_id

    def _drain(self, job: StreamJob) -> None:
        """Read each track to its end: the receiver wrote all audio before ``stop``."""
        for track in TRACKS:
            key = job.keys[track]
            while True:
                reply = self.client.xread({key: job.last_ids[key]}, count=_READ_COUNT)
                entries = [e for _, batch in _items(reply) for e in batch]
                if not entries:
                    break
                self._apply(job, track, key, entries)

    def _finish(self, job: StreamJob, reason: str | None = None) -> None:
        record = job.finish(reason)
        self.client.xack(self.control, self.options.group, job.control_id)
        del self.jobs[job.control_id]
        self.finished += 1
        lengths = ", ".join(
            f"{t} {info['samples'] / info['sample_rate_hz']:.2f} s"
            for t, info in record["tracks"].items()
        )
        where = f"; files in {job.directory}" if job.directory is not None else ""
        status = record["status"] + (f" ({record['reason']})" if record["reason"] else "")
        print(f"{job.stream_id}: {status}; {lengths or 'no audio'}{where}", file=self.out)
        self.out.flush()

    def _expire_stale(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if now - job.seen_at > self.options.stream_timeout_s:
                reason = f"no entry for {self.options.stream_timeout_s:g} s"
                logger.warning("stream %s: %s; finishing it", job.stream_id, reason)
                self._finish(job, reason)


def add_consume_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``consume`` to the main CLI's subcommands; it dispatches to ``run``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "consume",
        help="rebuild streams from Redis as WAV files (a worker of a consumer group)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``receiver consume``."""
    parser.add_argument("--url", help=f"Redis URL (RECEIVER_REDIS_URL, default {DEFAULT_URL})")
    parser.add_argument("--prefix", help="key prefix (RECEIVER_REDIS_PREFIX, default receiver)")
    parser.add_argument("--group", default=DEFAULT_GROUP, help=f"default {DEFAULT_GROUP}")
    parser.add_argument(
        "--consumer",
        help="this worker's name in the group (default: host-pid); keep it stable"
        " across restarts to resume its streams at once",
    )
    parser.add_argument(
        "--output-dir", "-o", type=Path, help="write <stream_id>/{inbound,outbound}.wav here"
    )
    parser.add_argument(
        "--levels", action="store_true", help="print each track's level once a second"
    )
    parser.add_argument(
        "--count", type=int, default=0, help="exit after finishing this many streams"
    )
    parser.add_argument("--block-ms", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument(
        "--claim-idle-s",
        type=float,
        default=60.0,
        help="take over streams of a worker silent this long (default 60)",
    )
    parser.add_argument(
        "--stream-timeout-s",
        type=float,
        default=120.0,
        help="finish a stream with no entry for this long as incomplete (default 120)",
    )
    parser.add_argument(
        "--new-only",
        action="store_true",
        help="a new group starts at new streams instead of every stream still in Redis",
    )


def options_from_args(args: argparse.Namespace) -> ConsumeOptions:
    """Options from the command line, with the URL and prefix from settings when not given."""
    if args.output_dir is None and not args.levels:
        raise ConfigError("--output-dir", "give --output-dir DIR, --levels, or both")
    url, prefix = args.url, args.prefix
    if url is None or prefix is None:
        from receiver.settings import load_settings

        settings = load_settings()
        if url is None:
            url = getattr(settings, "redis_url", DEFAULT_URL)
            url = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url)
        if prefix is None:
            prefix = str(getattr(settings, "redis_prefix", DEFAULT_PREFIX))
    return ConsumeOptions(
        url=url,
        prefix=prefix,
        group=args.group,
        consumer=args.consumer or f"{socket.gethostname()}-{os.getpid()}",
        output_dir=args.output_dir,
        levels=args.levels,
        count=max(0, args.count),
        block_ms=max(10, args.block_ms),
        claim_idle_s=max(1.0, args.claim_idle_s),
        stream_timeout_s=max(1.0, args.stream_timeout_s),
        new_only=args.new_only,
    )


def run(args: argparse.Namespace) -> int:
    """``receiver consume``: work until SIGINT/SIGTERM (or ``--count`` streams); exit code."""
    options = options_from_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    client = redis.Redis.from_url(
        options.url,
        # A blocking read must not look like a dead server.
        socket_timeout=options.block_ms / 1000 + 10,
        socket_connect_timeout=5,
    )
    consumer = Consumer(client, options)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        consumer.stop()

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        return consumer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        client.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m receiver.consume``: the same as ``receiver consume``."""
    parser = argparse.ArgumentParser(prog="receiver consume", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as exc:
        print(f"receiver consume: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
