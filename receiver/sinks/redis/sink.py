"""The ``redis`` sink: every stream's audio and events as Redis Streams, for workers elsewhere.

Keys and fields are in ``receiver.sinks.redis.wire`` (and ``docs/redis.md``). ``ID`` is
``safe_dirname(streamSid)`` plus 8 random hex digits: the sid is client text, so it never
reaches a key as sent (it stays inside entries), and two streams with one sid never share keys.

Why a thread and the sync client rather than ``redis.asyncio``: a thread keeps one connection
pool per process whatever the event loop (``redis.asyncio`` pools belong to the loop that made
them), and the event loop only copies samples and appends to a queue; the writer thread sends
what has queued up as one pipeline of ``XADD ... MAXLEN ~`` commands. ``aclose`` waits for the
stream's ``stop`` to be written through a future the thread resolves: the loop never blocks.

Outages: when Redis is unreachable the writer keeps the entries, retries with exponential
backoff and jitter, and sends them in order once Redis is back. The queue of one process holds
at most ``RECEIVER_REDIS_MAX_QUEUED_BYTES``; past it the oldest audio batches, DTMF and marks are
dropped (never ``start``, ``gap`` or ``stop``), counted per stream, and the stream publishes a
``gap`` entry naming each track's lost span, so that consumers mark it. Entries Redis refuses
(a wrong type, out of memory) are named in ``stream.json`` through the ``Fanout``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from numpy.typing import NDArray
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from receiver.events import Track
from receiver.exceptions import ReceiverError
from receiver.session import DtmfRecord, MarkRecord
from receiver.sinks.base import StreamInfo, StreamSummary
from receiver.sinks.redis.wire import (
    ControlKind,
    Fields,
    audio_fields,
    control_fields,
    control_key,
    make_stream_id,
    stream_keys,
    to_json,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from receiver.settings import Settings

logger = logging.getLogger("receiver.sinks.redis")

# One pipeline holds at most this much: big enough to amortise the round trip, small enough
# that a slow Redis never holds the writer for long on one call.
_PIPELINE_ENTRIES = 256
_PIPELINE_BYTES = 4 * 1024 * 1024
# A hung Redis fails a pipeline within the socket timeout; the writer then retries after a
# backoff that starts small (a restart takes about a second) and is capped.
_SOCKET_TIMEOUT_S = 5.0
_CONNECT_TIMEOUT_S = 2.0
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 5.0


class RedisSinkError(ReceiverError):
    """The stream's copy in Redis is incomplete: why, in words safe for logs and stream.json."""


@dataclass(slots=True)
class _Span:
    """Samples of one track the queue dropped: ``[start, end)`` on the track's timeline."""

    start: int
    end: int


class _StreamState:
    """What the writer thread and a stream's sink share, under the publisher's lock."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.error: str | None = None
        self.done = False
        self.on_done: list[Callable[[], None]] = []
        self.dropped_batches = 0
        self.dropped_samples = 0
        self.dropped_events = 0
        # Spans dropped since the last gap entry, per track, merged when adjacent.
        self.unreported: dict[str, list[_Span]] = {}
        self.gaps: list[dict[str, Any]] = []


@dataclass(slots=True)
class _Entry:
    """One ``XADD`` of ``fields`` to each of ``keys``, then ``EXPIRE`` of ``expire`` keys."""

    state: _StreamState
    keys: tuple[str, ...]
    fields: Fields
    maxlen: int
    size: int
    droppable: bool = True
    final: bool = False
    expire: tuple[str, ...] = ()
    ttl_s: int = 0
    # For an audio entry: its track, position and length, to report a drop as a span.
    audio: tuple[str, int, int] | None = None

    @property
    def commands(self) -> int:
        return len(self.keys) + len(self.expire)


class RedisPublisher:
    """The process's writer: a bounded queue, one thread, one connection pool.

    ``put`` never blocks on the network. The thread sends queued entries in pipelines; when
    Redis is unreachable it keeps them and retries, in order.
    """

    def __init__(self, *, url: str, max_queued_bytes: int) -> None:
        self.max_queued_bytes = max_queued_bytes
        # No retries inside redis-py: the writer's own loop retries, with the queue bounded.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=_SOCKET_TIMEOUT_S,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            health_check_interval=30,
        )
        self._cond = threading.Condition()
        self._queue: deque[_Entry] = deque()
        self._queued_bytes = 0
        self._closing = False
        self._shutting_down = threading.Event()
        self.down_since: str | None = None
        self.retries = 0
        self.dropped_batches = 0
        self._thread = threading.Thread(target=self._run, name="receiver-redis", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the writer (for tests and metrics)."""
        return self._queued_bytes

    def put(self, entry: _Entry) -> bool:
        """Queue ``entry``, dropping the oldest droppable entries to make room for audio.

        False when ``entry`` itself is droppable and there is no room even so.
        """
        with self._cond:
            if self._closing:
                self._finish(entry.state, "the Redis writer was shut down")
                return False
            # start, gap and stop are small and never dropped: they may pass the bound a little
            # rather than cost audio (and the counts in a stop entry stay exact).
            need = self._queued_bytes + entry.size - self.max_queued_bytes
            if need > 0 and entry.droppable:
                self._drop_oldest(need)
                if self._queued_bytes + entry.size > self.max_queued_bytes:
                    self._dropped(entry)
                    return False
            self._queue.append(entry)
            self._queued_bytes += entry.size
            self._cond.notify()
        return True

    def when_done(self, state: _StreamState, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the writer thread) once ``state``'s stop was handled."""
        with self._cond:
            if state.done:
                callback()
            else:
                state.on_done.append(callback)

    def take_unreported(self, state: _StreamState) -> dict[str, list[_Span]]:
        """The spans dropped since the last call: the sink publishes them as a gap entry."""
        with self._cond:
            spans, state.unreported = state.unreported, {}
            return spans

    def shutdown(self, *, timeout_s: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout_s``), stop the thread, close the pool."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._shutting_down.set()
        self._thread.join(timeout_s)
        with self._cond:
            lost = len(self._queue)
            for entry in self._queue:
                self._finish(entry.state, "the Redis writer was shut down")
            self._queue.clear()
        if lost:
            logger.error("Redis still unreachable at shutdown: %d entries not written", lost)
        self.client.close()

    def _drop_oldest(self, need: int) -> None:
        """Drop droppable entries from the front until ``need`` bytes are free (caller locks)."""
        kept: list[_Entry] = []
        while need > 0 and self._queue:
            entry = self._queue.popleft()
            if entry.droppable:
                self._queued_bytes -= entry.size
                need -= entry.size
                self._dropped(entry)
            else:
                kept.append(entry)
        self._queue.extendleft(reversed(kept))

    def _dropped(self, entry: _Entry) -> None:
        state = entry.state
        if entry.audio is None:
            state.dropped_events += 1
            return
        track, position, length = entry.audio
        state.dropped_batches += 1
        state.dropped_samples += length
        self.dropped_batches += 1
        spans = state.unreported.setdefault(track, [])
        if spans and spans[-1].end == position:
            spans[-1].end += length
        else:
            spans.append(_Span(position, position + length))

    def _take(self) -> list[_Entry] | None:
        """The next pipeline's entries; None once shut down and drained (or unreachable)."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue or (self._closing and self.down_since is not None):
                return None
            batch: list[_Entry] = []
            size = 0
            while self._queue and len(batch) < _PIPELINE_ENTRIES and size < _PIPELINE_BYTES:
                entry = self._queue.popleft()
                self._queued_bytes -= entry.size
                batch.append(entry)
                size += entry.size
            return batch

    def _run(self) -> None:
        delay = _RETRY_FIRST_S
        while (batch := self._take()) is not None:
            error = self._send(batch)
            if error is None:
                delay = _RETRY_FIRST_S
                continue
            # Put the batch back in front, in order, and wait before the next attempt.
            with self._cond:
                self._queue.extendleft(reversed(batch))
                self._queued_bytes += sum(entry.size for entry in batch)
                if self.down_since is None:
                    logger.error(
                        "Redis unreachable (%s): keeping entries (up to %d bytes) and retrying",
                        error,
                        self.max_queued_bytes,
                    )
                    self.down_since = error
                self.retries += 1
            # Only a shutdown cuts the wait short (new entries must not speed up retries).
            self._shutting_down.wait(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            delay = min(delay * 2, _RETRY_MAX_S)

    def _send(self, batch: list[_Entry]) -> str | None:
        """Send one pipeline; the connection error if Redis could not be reached."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for entry in batch:
                for key in entry.keys:
                    pipe.xadd(key, entry.fields, maxlen=entry.maxlen, approximate=True)
                for key in entry.expire:
                    pipe.expire(key, entry.ttl_s)
            results = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - anything else is the streams' failure
            results = [exc] * sum(entry.commands for entry in batch)
        with self._cond:
            if self.down_since is not None:
                logger.info("Redis reachable again: sending the entries kept meanwhile")
                self.down_since = None
            at = 0
            for entry in batch:
                for result in results[at : at + entry.commands]:
                    if isinstance(result, Exception):
                        error = f"Redis refused an entry: {type(result).__name__}: {result}"
                        entry.state.error = entry.state.error or error
                at += entry.commands
                if entry.final:
                    self._finish(entry.state, None)
        return None

    def _finish(self, state: _StreamState, error: str | None) -> None:
        """Mark ``state`` done and run its callbacks (caller holds the lock)."""
        if error is not None:
            state.error = state.error or error
        state.done = True
        callbacks, state.on_done = state.on_done, []
        for callback in callbacks:
            callback()


class _PublisherCollector(Collector):
    """The writer's figures, read at scrape time (the thread only bumps plain integers)."""

    def __init__(self, publisher: RedisPublisher) -> None:
        self._publisher = publisher

    def collect(self) -> Iterator[Metric]:
        p = self._publisher
        yield GaugeMetricFamily(
            "receiver_redis_queued_bytes", "Bytes waiting for Redis.", value=p.queued_bytes
        )
        yield GaugeMetricFamily(
            "receiver_redis_down", "1 while Redis is unreachable.", value=p.down_since is not None
        )
        yield CounterMetricFamily(
            "receiver_redis_retries", "Pipelines retried after Redis failed.", value=p.retries
        )
        yield CounterMetricFamily(
            "receiver_redis_dropped_batches",
            "Audio batches dropped past the queue bound.",
            value=p.dropped_batches,
        )


class UnusableSink:
    """Stands for a ``RedisSink`` that cannot be made: ``open`` raises, naming why."""

    location: str | None = None
    writes_record = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def open(self, info: StreamInfo) -> None:
        raise RedisSinkError(self.reason)

    def write(self, track: Track, position: int, samples: NDArray[np.int16]) -> None:
        raise RedisSinkError(self.reason)

    def event(self, record: DtmfRecord | MarkRecord) -> None:
        raise RedisSinkError(self.reason)

    def close(self, summary: StreamSummary) -> None:
        """Nothing was opened."""


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """What every stream's sink takes from the settings."""

    prefix: str
    maxlen: int
    ttl_s: float
    flush_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisOptions:
        return cls(
            prefix=settings.redis_prefix,
            maxlen=settings.redis_maxlen,
            ttl_s=settings.redis_ttl_s,
            flush_timeout_s=settings.redis_flush_timeout_s,
        )


class RedisSinks:
    """The ``redis`` entry point: one publisher per ``Receiver`` (its lifecycle), a sink per
    stream. ``start`` never raises for a URL redis-py refuses: streams then get a sink whose
    ``open`` fails, so only this sink is lost."""

    def __init__(self) -> None:
        self.publisher: RedisPublisher | None = None
        self._unusable: str | None = None
        self._options: RedisOptions | None = None

    async def start(self, settings: Settings, *, registry: CollectorRegistry) -> None:
        """Start the writer thread and register its metrics."""
        self._options = RedisOptions.from_settings(settings)
        try:
            self.publisher = RedisPublisher(
                url=settings.redis_url.get_secret_value(),
                max_queued_bytes=settings.redis_max_queued_bytes,
            )
        except ValueError:
            # redis-py's message may quote the URL, which may hold a password.
            self._unusable = "RECEIVER_REDIS_URL is not a redis://, rediss:// or unix:// URL"
            return
        registry.register(_PublisherCollector(self.publisher))

    async def stop(self) -> None:
        """Flush what is queued (for a few seconds) and stop the writer."""
        if self.publisher is not None:
            await asyncio.to_thread(self.publisher.shutdown)
            self.publisher = None

    def __call__(self, settings: Settings) -> RedisSink | UnusableSink:
        if self.publisher is None or self._options is None:
            return UnusableSink(self._unusable or "the redis sink was not started")
        return RedisSink(self.publisher, self._options)


class RedisSink:
    """One stream published to Redis; see the module docstring for keys and guarantees."""

    writes_record = False

    def __init__(self, publisher: RedisPublisher, options: RedisOptions) -> None:
        self.publisher = publisher
        self.options = options
        self.stream_id: str | None = None
        self.keys: dict[str, str] = {}
        self._state: _StreamState | None = None
        self._sid = ""
        self._rate = 0
        self._published: dict[Track, int] = {}
        self._reported = False

    @property
    def location(self) -> str | None:
        """Where the stream went, for the stream's last log line."""
        return f"redis {self.keys['events'].removesuffix(':events')}" if self.keys else None

    def open(self, info: StreamInfo) -> None:
        """Name the stream's keys and queue its ``start`` entry."""
        self._sid = info.start.stream_sid
        self.stream_id = make_stream_id(self._sid)
        self.keys = stream_keys(self.options.prefix, self.stream_id)
        self._state = _StreamState(self.stream_id)
        codec = info.codec
        self._rate = codec.sample_rate_hz if codec else info.start.media_format.sample_rate_hz
        data = info.as_dict()
        data.update(
            stream_id=self.stream_id,
            unsupported_reason=info.unsupported_reason,
            keys=self.keys,
        )
        self._control("start", data, droppable=False)

    def write(self, track: Track, position: int, samples: NDArray[np.int16]) -> None:
        """Queue one batch; the oldest are dropped (counted, reported as a gap) past the bound."""
        self._raise_if_failed()
        fields = audio_fields(position=position, rate_hz=self._rate, samples=samples)
        entry = self._entry((self.keys[track],), fields, 2 * len(samples) + 32)
        entry.audio = (track, position, len(samples))
        self.publisher.put(entry)
        self._published[track] = self._published.get(track, 0) + len(samples)
        self._report_gaps()

    def event(self, record: DtmfRecord | MarkRecord) -> None:
        """Queue a ``dtmf`` or ``mark`` entry."""
        self._raise_if_failed()
        if isinstance(record, DtmfRecord):
            kind: ControlKind = "dtmf"
            data: dict[str, Any] = {
                "digit": record.digit,
                "at_ms": record.at_ms,
                "duration_ms": record.duration_ms,
                "track": record.track,
            }
        else:
            kind, data = "mark", {"name": record.name, "at_ms": record.at_ms}
        self._control(kind, data, droppable=True)
        self._report_gaps()

    def close(self, summary: StreamSummary) -> None:
        """Queue ``stop``; raise (for ``stream.json``) when the copy is known to be incomplete."""
        state = self._state
        if state is None:
            return
        self._report_gaps()
        data = summary.as_dict()
        data["redis"] = {
            "complete": state.error is None and not (state.dropped_batches or state.dropped_events),
            "error": state.error,
            "dropped_batches": state.dropped_batches,
            "dropped_samples": state.dropped_samples,
            "dropped_events": state.dropped_events,
            "gaps": state.gaps,
            "published_samples": dict(self._published),
        }
        self._control("stop", data, droppable=False, final=True)
        if self._reported:
            return  # the error already reached the Fanout
        # What close raises reaches the Fanout: aclose then does not wait or repeat it.
        if state.error is not None:
            self._reported = True
            raise RedisSinkError(state.error)
        down = self.publisher.down_since
        if down is not None:
            self._reported = True
            raise RedisSinkError(
                f"Redis unreachable at the stream's end ({down}): its entries are kept in "
                "memory and sent when Redis is back"
            )
        if state.dropped_batches or state.dropped_events:
            self._reported = True
            raise RedisSinkError(
                f"Redis too slow or unreachable: dropped {state.dropped_batches} audio batches "
                f"({state.dropped_samples} samples) and {state.dropped_events} events "
                f"(queue limit {self.publisher.max_queued_bytes} bytes); gap entries name them"
            )

    async def aclose(self, summary: StreamSummary) -> None:
        """``close``, then wait (without blocking the loop) up to the flush timeout for ``stop``
        to be written: what fails is named in ``stream.json`` (the wav sink closes after)."""
        self.close(summary)
        state, timeout_s = self._state, self.options.flush_timeout_s
        if state is None or timeout_s <= 0 or self._reported:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def resolve() -> None:  # from the writer thread
            loop.call_soon_threadsafe(settle)

        self.publisher.when_done(state, resolve)
        try:
            async with asyncio.timeout(timeout_s):
                await done
        except TimeoutError:
            down = self.publisher.down_since
            raise RedisSinkError(
                f"stop not confirmed within {timeout_s:g} s"
                + (" (Redis unreachable; entries stay queued)" if down else "")
            ) from None
        if state.error is not None:
            self._reported = True
            raise RedisSinkError(state.error)

    def _report_gaps(self) -> None:
        """Publish a ``gap`` entry for spans the queue dropped since the last one."""
        assert self._state is not None
        if not self._state.unreported:  # nearly always: no lock a batch (a late one is next)
            return
        spans = self.publisher.take_unreported(self._state)
        if not spans:
            return
        data = {
            "tracks": {
                track: [{"start": s.start, "samples": s.end - s.start} for s in found]
                for track, found in spans.items()
            }
        }
        self._state.gaps.append(data)
        self._control("gap", data, droppable=False)

    def _raise_if_failed(self) -> None:
        state = self._state
        assert state is not None, "write or event before open"
        if state.error is not None and not self._reported:
            self._reported = True
            raise RedisSinkError(state.error)

    def _control(
        self, kind: ControlKind, data: Mapping[str, Any], *, droppable: bool, final: bool = False
    ) -> bool:
        assert self._state is not None and self.stream_id is not None
        body = to_json({"stream_sid": self._sid, **data})
        fields = control_fields(kind, stream_id=self.stream_id, rate_hz=self._rate, body=body)
        keys = (control_key(self.options.prefix), self.keys["events"])
        entry = self._entry(keys, fields, 2 * len(body) + 128)
        entry.droppable = droppable
        entry.final = final
        if final and self.options.ttl_s > 0:
            # Finished streams leave Redis on their own, read or not.
            entry.expire = tuple(self.keys.values())
            entry.ttl_s = max(1, round(self.options.ttl_s))
        return self.publisher.put(entry)

    def _entry(self, keys: tuple[str, ...], fields: Fields, size: int) -> _Entry:
        assert self._state is not None
        return _Entry(self._state, keys, fields, self.options.maxlen, size)
