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
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from receiver.session import TrackStats

if TYPE_CHECKING:
    from receiver.events import Track

# (counter prefix in Receiver.counters, metric name, label, help)
_LABELLED_COUNTERS = (
    (
        "rejected_",
        "receiver_handshake_rejections",
        "reason",
        "Handshakes refused before the upgrade (auth: no or wrong bearer token).",
    ),
    (
        "protocol_errors_",
        "receiver_protocol_errors",
        "kind",
        "Streams closed for breaking the protocol, by kind.",
    ),
    ("sink_errors_", "receiver_sink_errors", "sink", "Sink failures, by sink."),
    ("ended_", "receiver_streams_ended", "end", "Streams that ended, by how they ended."),
)
_TRACK_FIELDS = (
    ("frames", "receiver_frames", "Media frames received."),
    ("bytes", "receiver_audio_bytes", "Encoded audio bytes received."),
    ("audio_samples", "receiver_samples", "Audio samples received and kept."),
    ("gaps", "receiver_gaps", "Gaps (lost frames) filled with silence."),
    ("silence_samples", "receiver_silence_samples", "Samples of silence inserted for gaps."),
    ("duplicate_frames", "receiver_duplicate_frames", "Frames dropped as duplicates."),
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
        counters: Counter[str],
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
        counters: Counter[str],
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
        counters = self._counters
        yield CounterMetricFamily("receiver_streams", "Streams started.", value=counters["streams"])
        for prefix, name, label, doc in _LABELLED_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, value in sorted(counters.items()):
                if key.startswith(prefix):
                    family.add_metric([key.removeprefix(prefix)], value)
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
