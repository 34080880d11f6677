"""A worker of a consumer group: claims streams from ``P:control``, follows their keys,
rebuilds them (``rebuild.StreamJob``) and acknowledges each once its files are finished."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import redis
from redis.typing import KeyT, StreamIdT

from receiver.consume.rebuild import StreamJob
from receiver.consume.replies import Entry, Fields, stream_items, text
from receiver.events import TRACKS
from receiver.settings import Settings
from receiver.sinks.redis.wire import STREAM_ID, WireError, control_key, read_control

logger = logging.getLogger("receiver.consume")

DEFAULT_GROUP = "receiver-consume"
_READ_COUNT = 512


@dataclass(frozen=True, slots=True)
class ConsumeOptions:
    """What one worker does; see ``receiver consume --help``."""

    url: str = field(repr=False)  # may hold a password
    prefix: str = Settings.model_fields["redis_prefix"].default
    group: str = DEFAULT_GROUP
    consumer: str = "consumer"
    output_dir: Path | None = None
    levels: bool = False
    count: int = 0
    block_ms: int = 1000
    claim_idle_s: float = 60.0
    stream_timeout_s: float = 120.0
    new_only: bool = False


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
        for _, entries in stream_items(reply):
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
            entries = [e for _, batch in stream_items(reply) for e in batch]
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
            cursor = text(reply[0])
            for entry_id, fields in reply[1]:
                if fields is not None and text(entry_id) not in self.jobs:
                    logger.info("claimed an abandoned entry %s", text(entry_id))
                    self._on_control(text(entry_id), fields)
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
        owned = {text(p["message_id"]) for p in pending}
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
            # dtmf, mark, gap and stop reach the stream's worker through its own events key.
            self.client.xack(self.control, self.options.group, entry_id)
            return
        try:
            entry = read_control(fields)
        except WireError as exc:
            logger.warning("skipping start entry %s: %s", entry_id, exc)
            self.client.xack(self.control, self.options.group, entry_id)
            return
        if not STREAM_ID.fullmatch(entry.stream_id):
            logger.warning("skipping start entry %s: not a receiver stream id", entry_id)
            self.client.xack(self.control, self.options.group, entry_id)
            return
        job = StreamJob(
            control_id=entry_id,
            stream_id=entry.stream_id,
            start=entry.data,
            rate=entry.rate_hz or 8000,
            prefix=self.options.prefix,
            output_dir=self.options.output_dir,
            out=self.out if self.options.levels else None,
        )
        self.jobs[entry_id] = job
        logger.info("following stream %s", entry.stream_id)

    def _follow(self, *, block_ms: int) -> None:
        by_key = {key: (job, kind) for job in self.jobs.values() for kind, key in job.keys.items()}
        streams: dict[KeyT, StreamIdT] = {
            key: job.last_ids[key] for key, (job, _) in by_key.items()
        }
        reply = self.client.xread(streams, count=_READ_COUNT, block=block_ms)
        for key, entries in stream_items(reply):
            job, kind = by_key[key]
            self._apply(job, kind, key, entries)
        for job in [j for j in self.jobs.values() if j.stop is not None]:
            self._drain(job)
            self._finish(job)

    def _apply(self, job: StreamJob, kind: str, key: str, entries: list[Entry]) -> None:
        for entry_id, fields in entries:
            try:
                job.on_entry(kind, fields)
            except ValueError as exc:  # WireError, or a position past any plausible end
                logger.warning("stream %s: bad entry %s skipped: %s", job.stream_id, entry_id, exc)
            job.last_ids[key] = entry_id

    def _drain(self, job: StreamJob) -> None:
        """Read each track to its end: the receiver wrote all audio before ``stop``."""
        for track in TRACKS:
            key = job.keys[track]
            while True:
                reply = self.client.xread({key: job.last_ids[key]}, count=_READ_COUNT)
                entries = [e for _, batch in stream_items(reply) for e in batch]
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
