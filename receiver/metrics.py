"""Prometheus metrics of one receiver, in a registry of its own.

Totals are read when Prometheus scrapes (a custom collector over the receiver's counters, the
finished streams' totals and the live sessions' statistics), so the per-frame path pays nothing
for them. Only the two histograms are observed as things happen: once per batch per sink, and
once per stream.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from receiver.session import TrackStats

if TYPE_CHECKING:
    from receiver.events import Track


class Count(StrEnum):
    """Everything the receiver counts; each is exported as ``receiver_<name>_total``."""

    STREAMS = "streams"
    STREAMS_ENDED = "streams_ended"
    HANDSHAKE_REJECTIONS = "handshake_rejections"
    PROTOCOL_ERRORS = "protocol_errors"
    SINK_ERRORS = "sink_errors"
    INTERNAL_ERRORS = "internal_errors"
    RECORDING_FAILURES = "recording_failures"
    UNKNOWN_EVENTS = "unknown_events"
    WRITE_BUFFER_OVERFLOWS = "write_buffer_overflows"
    CONNECTIONS_REFUSED = "connections_refused"
    ACCEPT_ERRORS = "accept_errors"
    TLS_HANDSHAKE_FAILURES = "tls_handshake_failures"
    BAD_REQUESTS = "bad_requests"
    CLOSE_TIMEOUTS = "close_timeouts"
    HEALTH_FAILURES = "health_failures"
    MEMORY_TRIMS = "memory_trims"
    CONNECTIONS_CLOSED = "connections_closed"
    DROPPED = "dropped"
    STATUS_CALLBACKS = "status_callbacks"
    PLATFORM_STREAM_ERRORS = "platform_stream_errors"
    PLATFORM_EVENTS_DROPPED = "platform_events_dropped"


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """How one counter is exported: its label (None: a single value) and its help text."""

    label: str | None
    help: str


COUNTERS: dict[Count, CounterSpec] = {
    Count.STREAMS: CounterSpec(None, "Streams started."),
    Count.STREAMS_ENDED: CounterSpec("end", "Streams that ended, by how they ended."),
    Count.HANDSHAKE_REJECTIONS: CounterSpec(
        "reason", "Handshakes refused before the upgrade (auth: no or wrong bearer token)."
    ),
    Count.PROTOCOL_ERRORS: CounterSpec("kind", "Streams closed for breaking the protocol."),
    Count.SINK_ERRORS: CounterSpec("sink", "Sink failures, by sink."),
    Count.INTERNAL_ERRORS: CounterSpec(None, "Streams ended by a bug of the receiver."),
    Count.RECORDING_FAILURES: CounterSpec(None, "Streams closed 1011: no sink left to record."),
    Count.UNKNOWN_EVENTS: CounterSpec(None, "Messages of an unknown event, skipped."),
    Count.WRITE_BUFFER_OVERFLOWS: CounterSpec(
        None, "Connections aborted: a client that does not read what we send (pongs)."
    ),
    Count.CONNECTIONS_REFUSED: CounterSpec(
        "reason", "TCP connections closed at accept: too many handshakes in progress."
    ),
    Count.ACCEPT_ERRORS: CounterSpec("error", "accept() failures (EMFILE, ENFILE: out of fds)."),
    Count.TLS_HANDSHAKE_FAILURES: CounterSpec(
        "reason", "TLS handshakes that failed (plain_http: plain HTTP or ws:// to the TLS port)."
    ),
    Count.BAD_REQUESTS: CounterSpec("reason", "HTTP requests refused with 400 before routing."),
    Count.CLOSE_TIMEOUTS: CounterSpec(
        None, "Connections cut after our close frame went unanswered for the close timeout."
    ),
    Count.HEALTH_FAILURES: CounterSpec("reason", "/healthz answers of 503, by reason."),
    Count.CONNECTIONS_CLOSED: CounterSpec(
        None, "Connections admitted at accept that are closed (streams, requests, failed TLS)."
    ),
    Count.MEMORY_TRIMS: CounterSpec(
        None, "malloc_trim calls after floods of connections (memory handed back to the OS)."
    ),
    Count.DROPPED: CounterSpec(
        "what", "Items a stream sent past a per-stream bound (marks, dtmf, ...), dropped."
    ),
    Count.STATUS_CALLBACKS: CounterSpec(
        "outcome",
        "The platform's status callbacks, by outcome (stored, duplicate, bad_signature, ...).",
    ),
    Count.PLATFORM_STREAM_ERRORS: CounterSpec(
        "error", "stream-error callbacks, by StreamError (unknown errors: other)."
    ),
    Count.PLATFORM_EVENTS_DROPPED: CounterSpec(
        "what", "Status callback data past a bound (streams, events, field_chars, error_log)."
    ),
}


class Counters:
    """The receiver's counters: ``add(Count.X)`` or ``add(Count.X, label)``; read by key.

    ``counters[Count.X]`` is the total over every label, ``counters[Count.X, label]`` one label.
    """

    def __init__(self) -> None:
        self._values: Counter[tuple[Count, str]] = Counter()

    def add(self, counter: Count, label: str = "", *, amount: int = 1) -> None:
        """Count ``amount`` of ``counter`` (under ``label`` when it has one)."""
        self._values[(counter, label)] += amount

    def __getitem__(self, key: str | tuple[str, str]) -> int:
        if isinstance(key, tuple):
            return self._values[(Count(key[0]), key[1])]
        counter = Count(key)
        # list(): the metrics port's thread reads while the loop counts.
        return sum(v for (c, _), v in list(self._values.items()) if c is counter)

    def labels(self, counter: Count) -> dict[str, int]:
        """Every label of ``counter`` seen so far, with its value."""
        return {label: v for (c, label), v in sorted(list(self._values.items())) if c is counter}


_TRACK_FIELDS = (
    ("frames", "receiver_frames", "Media frames received."),
    ("bytes", "receiver_audio_bytes", "Encoded audio bytes received."),
    ("audio_samples", "receiver_samples", "Audio samples received and kept."),
    ("gaps", "receiver_gaps", "Gaps (lost frames) filled with silence."),
    ("silence_samples", "receiver_silence_samples", "Samples of silence inserted for gaps."),
    ("duplicate_frames", "receiver_duplicate_frames", "Frames dropped as duplicates."),
    ("late_frames", "receiver_late_frames", "Frames that came after a later chunk, dropped."),
    ("clock_jumps", "receiver_clock_jumps", "Jumps past RECEIVER_MAX_GAP_S: the clock shifted."),
    ("silence_capped", "receiver_silence_capped", "Gaps past RECEIVER_MAX_SILENCE_S: shifted."),
)


@dataclass(frozen=True, slots=True)
class LiveTracks:
    """One live stream's codec name and per-track statistics, as the collector reads them."""

    codec: str
    tracks: Mapping[Track, TrackStats]


class ReceiverMetrics:
    """The metrics registry of one receiver; ``render`` gives the text exposition format."""

    def __init__(
        self,
        *,
        counters: Counters,
        active_streams: Callable[[], int],
        live_streams: Callable[[], Iterable[LiveTracks]],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.finished: Counter[tuple[str, str, str]] = Counter()
        self.sink_write_seconds = Histogram(
            "receiver_sink_write_seconds",
            "Time one sink took to take one batch of audio.",
            ["sink"],
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
            registry=self.registry,
        )
        self.stream_duration_seconds = Histogram(
            "receiver_stream_duration_seconds",
            "Wall-clock length of finished streams.",
            buckets=(1, 10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800),
            registry=self.registry,
        )
        self.registry.register(_Collector(self, counters, active_streams, live_streams))

    def stream_finished(
        self, codec: str, tracks: Mapping[Track, TrackStats], duration_s: float
    ) -> None:
        """Fold a finished stream's track totals in and observe its duration."""
        for track, stats in tracks.items():
            for field, _, _ in _TRACK_FIELDS:
                self.finished[(codec, track, field)] += getattr(stats, field)
        self.stream_duration_seconds.observe(duration_s)

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry).decode("utf-8")


class _Collector(Collector):
    def __init__(
        self,
        metrics: ReceiverMetrics,
        counters: Counters,
        active_streams: Callable[[], int],
        live_streams: Callable[[], Iterable[LiveTracks]],
    ) -> None:
        self._metrics = metrics
        self._counters = counters
        self._active = active_streams
        self._live = live_streams

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "receiver_streams_active", "Streams being received now.", value=self._active()
        )
        for counter, spec in COUNTERS.items():
            name = f"receiver_{counter.value}"
            if spec.label is None:
                yield CounterMetricFamily(name, spec.help, value=self._counters[counter])
                continue
            family = CounterMetricFamily(name, spec.help, labels=[spec.label])
            for label, value in self._counters.labels(counter).items():
                family.add_metric([label], value)
            yield family
        totals = Counter(self._metrics.finished)
        for live in self._live():
            for track, stats in live.tracks.items():
                for field, _, _ in _TRACK_FIELDS:
                    totals[(live.codec, track, field)] += getattr(stats, field)
        for field, name, doc in _TRACK_FIELDS:
            family = CounterMetricFamily(name, doc, labels=["codec", "track"])
            for (codec, track_name, f), value in sorted(totals.items()):
                if f == field:
                    family.add_metric([codec, track_name], value)
            yield family
