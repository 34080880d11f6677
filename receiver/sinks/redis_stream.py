"""The ``redis`` sink: every stream's audio and events as Redis Streams, for workers elsewhere.

Keys (``P`` is ``RECEIVER_REDIS_PREFIX``, ``ID`` a key-safe id made per stream):

- ``P:control``: ``start``, ``dtmf``, ``mark`` and ``stop`` entries of every stream; consumer
  groups read it to share streams out among workers;
- ``P:stream:ID:events``: the same entries for one stream, which the worker that claimed it
  follows;
- ``P:stream:ID:inbound``, ``P:stream:ID:outbound``: the audio, one entry per batch.

``docs/redis.md`` describes every field. ``ID`` is ``safe_dirname(streamSid)`` plus 8 random hex
digits: the sid is client text, so it never reaches a key as sent (it stays inside entries), and
two streams with one sid never share keys.

Why a thread and the sync client rather than ``redis.asyncio``: the sink's methods are sync and
``close()`` must wait (with a timeout) until the stream's last entry is in Redis. A sync call on
the event loop cannot wait for a task on that same loop, but it can wait for a thread. A thread
also keeps one connection pool per process whatever the event loop (``redis.asyncio`` pools belong
to the loop that made them). The event loop only copies samples and appends to a queue; the
writer thread sends what has queued up as one pipeline of ``XADD ... MAXLEN ~`` commands.

Bounded memory: the queue of one process holds at most ``RECEIVER_REDIS_MAX_QUEUED_BYTES``. When
Redis is slower than the streams, new audio batches, DTMF and marks are dropped (never ``start``
or ``stop``), counted per stream, reported in the ``stop`` entry and raised from ``close()``. When
a stream's entries cannot be written (Redis down), the next call of the sink raises, so the
``Fanout`` names the error in ``stream.json`` and the other sinks carry on.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from numpy.typing import NDArray
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from receiver.events import TRACKS, Track
from receiver.exceptions import ReceiverError
from receiver.session import DtmfRecord, MarkRecord
from receiver.sinks.base import StreamInfo, StreamSummary
from receiver.sinks.wav import safe_dirname

if TYPE_CHECKING:
    from receiver.settings import Settings

logger = logging.getLogger("receiver.sinks.redis")

FORMAT_VERSION = 1
DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_PREFIX = "receiver"
DEFAULT_MAXLEN = 100_000
DEFAULT_TTL_S = 86_400.0
DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024
DEFAULT_FLUSH_TIMEOUT_S = 2.0

# One pipeline holds at most this much: big enough to amortise the round trip, small enough
# that a slow Redis never holds the writer for long on one call.
_PIPELINE_ENTRIES = 256
_PIPELINE_BYTES = 4 * 1024 * 1024
# A dead Redis must fail a pipeline in well under a second (connection refused, then two quick
# retries), and a hung one within the socket timeout: streams learn it from their next call.
_SOCKET_TIMEOUT_S = 5.0
_CONNECT_TIMEOUT_S = 2.0


class RedisSinkError(ReceiverError):
    """The stream's copy in Redis is incomplete: why, in words safe for logs and stream.json."""


Fields = dict[FieldT, EncodableT]


def stream_keys(prefix: str, stream_id: str) -> dict[str, str]:
    """The keys of one stream: ``events`` and one per track."""
    base = f"{prefix}:stream:{stream_id}"
    return {"events": f"{base}:events", **{track: f"{base}:{track}" for track in TRACKS}}


def control_key(prefix: str) -> str:
    """The stream of every stream's start, dtmf, mark and stop entries."""
    return f"{prefix}:control"


def _json(value: Any) -> str:
    # ensure_ascii: client text (sids, parameters) may hold lone surrogates UTF-8 cannot carry.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


class _StreamState:
    """What the writer thread tells a stream's sink; it only ever sets ``error`` and ``done``."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.error: str | None = None
        self.done = threading.Event()


@dataclass(slots=True)
class _Entry:
    """One ``XADD`` of ``fields`` to each of ``keys``, then ``EXPIRE`` of ``expire`` keys."""

    state: _StreamState
    keys: tuple[str, ...]
    fields: Fields
    maxlen: int
    size: int
    final: bool = False
    expire: tuple[str, ...] = ()
    ttl_s: int = 0

    @property
    def commands(self) -> int:
        return len(self.keys) + len(self.expire)


@dataclass(frozen=True, slots=True)
class PublisherConfig:
    """What a publisher is shared by: one per URL and queue bound in a process."""

    url: str = field(repr=False)  # may hold a password
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES


class RedisPublisher:
    """The process's writer: a bounded queue, one thread, one connection pool.

    ``put`` never blocks on the network. The thread sends queued entries in pipelines and
    records failures on each entry's stream state.
    """

    def __init__(self, config: PublisherConfig) -> None:
        self.config = config
        self.max_queued_bytes = config.max_queued_bytes
        self.client = redis.Redis.from_url(
            config.url,
            socket_timeout=_SOCKET_TIMEOUT_S,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2),
            health_check_interval=30,
        )
        self._cond = threading.Condition()
        self._queue: deque[_Entry] = deque()
        self._queued_bytes = 0
        self._closing = False
        self._down: str | None = None
        # Pipelines finished, failed or not: lets close() see that the writer is stuck.
        self.progress = 0
        self.stalled_at: int | None = None
        self._thread = threading.Thread(target=self._run, name="receiver-redis", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the writer (for tests and metrics)."""
        return self._queued_bytes

    def put(self, entry: _Entry, *, droppable: bool) -> bool:
        """Queue ``entry``; a droppable one is refused (False) when the queue is full."""
        with self._cond:
            if self._closing:
                entry.state.error = entry.state.error or "the Redis writer was shut down"
                entry.state.done.set()
                return False
            if droppable and self._queued_bytes + entry.size > self.max_queued_bytes:
                return False
            self._queue.append(entry)
            self._queued_bytes += entry.size
            self._cond.notify()
        return True

    def shutdown(self, *, timeout_s: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout_s``), stop the thread, close the pool."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)
        self.client.close()

    def _take(self) -> list[_Entry] | None:
        """The next pipeline's entries; None once shut down and drained."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            batch: list[_Entry] = []
            size = 0
            while self._queue and len(batch) < _PIPELINE_ENTRIES and size < _PIPELINE_BYTES:
                entry = self._queue.popleft()
                self._queued_bytes -= entry.size
                # A stream whose entries already failed sends nothing more but its stop.
                if entry.state.error is not None and not entry.final:
                    continue
                batch.append(entry)
                size += entry.size
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._send(batch)
            self.progress += 1

    def _send(self, batch: list[_Entry]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for entry in batch:
                for key in entry.keys:
                    pipe.xadd(key, entry.fields, maxlen=entry.maxlen, approximate=True)
                for key in entry.expire:
                    pipe.expire(key, entry.ttl_s)
            results = pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - any failure is the streams' failure, not ours
            self._failed(batch, f"{type(exc).__name__}: {exc}")
        else:
            self._succeeded(batch, results)
        finally:
            for entry in batch:
                if entry.final:
                    entry.state.done.set()

    def _failed(self, batch: list[_Entry], error: str) -> None:
        message = f"Redis write failed: {error}"
        if self._down is None:
            logger.error("%s (streams lose their Redis copy until it is back)", message)
        self._down = message
        for entry in batch:
            entry.state.error = entry.state.error or message

    def _succeeded(self, batch: list[_Entry], results: list[Any]) -> None:
        if self._down is not None:
            logger.info("Redis writes work again")
            self._down = None
        at = 0
        for entry in batch:
            for result in results[at : at + entry.commands]:
                if isinstance(result, Exception):
                    error = f"Redis refused an entry: {type(result).__name__}: {result}"
                    entry.state.error = entry.state.error or error
            at += entry.commands


_publishers: dict[PublisherConfig, RedisPublisher] = {}
_publishers_lock = threading.Lock()


def publisher_for(config: PublisherConfig) -> RedisPublisher:
    """The process's publisher for ``config``, started on first use and shared by streams."""
    with _publishers_lock:
        publisher = _publishers.get(config)
        if publisher is None:
            publisher = _publishers[config] = RedisPublisher(config)
        return publisher


def close_publishers(*, timeout_s: float = 5.0) -> None:
    """Flush and stop every publisher of this process (tests, embedding programs)."""
    with _publishers_lock:
        publishers = list(_publishers.values())
        _publishers.clear()
    for publisher in publishers:
        publisher.shutdown(timeout_s=timeout_s)


def _setting(settings: Settings, name: str, default: Any) -> Any:
    """A redis setting, or its default while settings.py does not have it yet."""
    value = getattr(settings, name, default)
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    return value


class UnusableSink:
    """Stands for a ``RedisSink`` that cannot be made: ``open`` raises, naming why."""

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


class RedisSink:
    """One stream published to Redis; see the module docstring for keys and guarantees."""

    def __init__(
        self,
        publisher: RedisPublisher,
        *,
        prefix: str = DEFAULT_PREFIX,
        maxlen: int = DEFAULT_MAXLEN,
        ttl_s: float = DEFAULT_TTL_S,
        flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S,
    ) -> None:
        self.publisher = publisher
        self.prefix = prefix
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self.flush_timeout_s = flush_timeout_s
        self.stream_id: str | None = None
        self.keys: dict[str, str] = {}
        self.dropped_batches = 0
        self.dropped_samples = 0
        self.dropped_events = 0
        self._state: _StreamState | None = None
        self._sid = ""
        self._rate = 0
        self._published: dict[Track, int] = {}
        self._reported = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisSink | UnusableSink:
        """The ``receiver.sinks`` entry point: one sink per stream, one publisher per process.

        It never raises (the server calls factories outside the Fanout's protection): a URL
        redis-py refuses gives a sink whose ``open`` fails, so only this sink is lost.
        """
        config = PublisherConfig(
            url=str(_setting(settings, "redis_url", DEFAULT_URL)),
            max_queued_bytes=int(
                _setting(settings, "redis_max_queued_bytes", DEFAULT_MAX_QUEUED_BYTES)
            ),
        )
        try:
            publisher = publisher_for(config)
        except ValueError:
            # redis-py's message may quote the URL, which may hold a password.
            return UnusableSink("RECEIVER_REDIS_URL is not a redis://, rediss:// or unix:// URL")
        return cls(
            publisher,
            prefix=str(_setting(settings, "redis_prefix", DEFAULT_PREFIX)),
            maxlen=int(_setting(settings, "redis_maxlen", DEFAULT_MAXLEN)),
            ttl_s=float(_setting(settings, "redis_ttl_s", DEFAULT_TTL_S)),
            flush_timeout_s=float(
                _setting(settings, "redis_flush_timeout_s", DEFAULT_FLUSH_TIMEOUT_S)
            ),
        )

    @property
    def location(self) -> str | None:
        """Where the stream went, for the stream's last log line."""
        return f"redis {self.keys['events'].removesuffix(':events')}" if self.keys else None

    def open(self, info: StreamInfo) -> None:
        """Name the stream's keys and queue its ``start`` entry."""
        self._sid = info.start.stream_sid
        self.stream_id = f"{safe_dirname(self._sid)}.{secrets.token_hex(4)}"
        self.keys = stream_keys(self.prefix, self.stream_id)
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
        """Queue one batch as int16 little-endian bytes; dropped (and counted) if Redis lags."""
        self._raise_if_failed()
        payload = samples.astype("<i2", copy=False).tobytes()
        fields: Fields = {"position": position, "rate": self._rate, "samples": payload}
        entry = self._entry((self.keys[track],), fields, len(payload) + 32)
        if self.publisher.put(entry, droppable=True):
            self._published[track] = self._published.get(track, 0) + len(samples)
        else:
            self.dropped_batches += 1
            self.dropped_samples += len(samples)

    def event(self, record: DtmfRecord | MarkRecord) -> None:
        """Queue a ``dtmf`` or ``mark`` entry."""
        self._raise_if_failed()
        if isinstance(record, DtmfRecord):
            kind = "dtmf"
            data: dict[str, Any] = {
                "digit": record.digit,
                "at_ms": record.at_ms,
                "duration_ms": record.duration_ms,
                "track": record.track,
            }
        else:
            kind, data = "mark", {"name": record.name, "at_ms": record.at_ms}
        if not self._control(kind, data, droppable=True):
            self.dropped_events += 1

    def close(self, summary: StreamSummary) -> None:
        """Queue ``stop``, wait up to the flush timeout for it, raise if the copy is incomplete."""
        state = self._state
        if state is None:
            return
        complete = state.error is None and not (self.dropped_batches or self.dropped_events)
        data = summary.as_dict()
        data["redis"] = {
            "complete": complete,
            "error": state.error,
            "dropped_batches": self.dropped_batches,
            "dropped_samples": self.dropped_samples,
            "dropped_events": self.dropped_events,
            "published_samples": dict(self._published),
        }
        self._control("stop", data, droppable=False, final=True)
        if self._reported:
            return  # the error already reached the Fanout; do not hold the loop for it
        self._flush(state)
        if state.error is not None:
            raise RedisSinkError(state.error)
        if self.dropped_batches or self.dropped_events:
            raise RedisSinkError(
                f"Redis too slow: dropped {self.dropped_batches} audio batches "
                f"({self.dropped_samples} samples) and {self.dropped_events} events "
                f"(queue limit {self.publisher.max_queued_bytes} bytes)"
            )

    def _flush(self, state: _StreamState) -> None:
        """Wait until the writer has handled ``stop``: every earlier entry went first."""
        publisher = self.publisher
        if self.flush_timeout_s <= 0:
            return
        if publisher.stalled_at is not None and publisher.stalled_at == publisher.progress:
            # An earlier close already waited in vain and the writer has not moved since:
            # waiting again would only hold the event loop longer.
            raise RedisSinkError("not confirmed: the Redis writer is stalled")
        if not state.done.wait(self.flush_timeout_s):
            publisher.stalled_at = publisher.progress
            raise RedisSinkError(
                f"not confirmed within {self.flush_timeout_s:g} s "
                f"({publisher.queued_bytes} bytes still queued for Redis)"
            )
        publisher.stalled_at = None

    def _raise_if_failed(self) -> None:
        state = self._state
        assert state is not None, "write or event before open"
        if state.error is not None and not self._reported:
            self._reported = True
            raise RedisSinkError(state.error)

    def _control(
        self, kind: str, data: Mapping[str, Any], *, droppable: bool, final: bool = False
    ) -> bool:
        assert self._state is not None and self.stream_id is not None
        body = _json({"stream_sid": self._sid, **data})
        fields: Fields = {
            "v": FORMAT_VERSION,
            "type": kind,
            "stream_id": self.stream_id,
            "rate": self._rate,
            "data": body,
        }
        keys = (control_key(self.prefix), self.keys["events"])
        entry = self._entry(keys, fields, 2 * len(body) + 128)
        entry.final = final
        if final and self.ttl_s > 0:
            # Finished streams leave Redis on their own, read or not.
            entry.expire = tuple(self.keys.values())
            entry.ttl_s = max(1, round(self.ttl_s))
        return self.publisher.put(entry, droppable=droppable)

    def _entry(self, keys: tuple[str, ...], fields: Fields, size: int) -> _Entry:
        assert self._state is not None
        return _Entry(self._state, keys, fields, self.maxlen, size)
