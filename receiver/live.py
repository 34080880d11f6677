"""Live audio for code in the same process: ``async for batch in stream.audio("inbound")``.

::

    live = LiveAudio()
    receiver = Receiver(settings, ssl_context=context,
                        sink_factories=[("wav", WavSink.from_settings), live.sink()])
    await receiver.start()
    async for stream in live.streams():          # one LiveStream per started stream
        asyncio.create_task(transcribe(stream))

    async def transcribe(stream: LiveStream) -> None:
        async for batch in stream.audio("inbound"):   # AudioBatch: track, position, samples
            ...                                       # ends when the stream ends

A slow consumer never slows the receiver: each reader of a track keeps at most ``max_queued_s``
of audio and drops the oldest batches past that, counting them in
``LiveStream.dropped_batches``. Several readers of one track each get every batch.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from receiver.events import Track
from receiver.session import AudioBatch, DtmfRecord, MarkRecord
from receiver.sinks.base import SinkFactory, StreamInfo, StreamSummary

__all__ = [
    "LiveAudio",
    "LiveStream",
]

if TYPE_CHECKING:
    from receiver.settings import Settings


class _Queue:
    """Batches of one track for one reader, at most ``max_samples`` of audio (oldest dropped)."""

    def __init__(self, max_samples: int, batches: Iterable[AudioBatch] = ()) -> None:
        self.batches: deque[AudioBatch] = deque(batches)
        self.samples = sum(len(b.samples) for b in self.batches)
        self.max_samples = max_samples

    def put(self, batch: AudioBatch) -> int:
        """Queue ``batch``; return how many old batches were dropped to make room."""
        self.batches.append(batch)
        self.samples += len(batch.samples)
        dropped = 0
        while self.samples > self.max_samples and len(self.batches) > 1:
            self.samples -= len(self.batches.popleft().samples)
            dropped += 1
        return dropped

    def get(self) -> AudioBatch:
        batch = self.batches.popleft()
        self.samples -= len(batch.samples)
        return batch


class LiveStream:
    """One stream as it happens: its info, its audio per track, its events, its summary."""

    def __init__(self, info: StreamInfo, *, max_queued_s: float) -> None:
        self.info = info
        rate = info.codec.sample_rate_hz if info.codec else 8000
        self._max_samples = int(max_queued_s * rate)
        # The last max_queued_s of each track, for readers that start late.
        self._backlog: dict[Track, _Queue] = {}
        self._readers: dict[Track, list[_Queue]] = {}
        self._wakeup = asyncio.Event()
        self.events: list[DtmfRecord | MarkRecord] = []
        self.summary: StreamSummary | None = None
        self.dropped_batches = 0

    @property
    def ended(self) -> bool:
        """True once the stream has ended (queued audio may still be read)."""
        return self.summary is not None

    async def audio(self, track: Track) -> AsyncIterator[AudioBatch]:
        """Batches of ``track`` in order until the stream ends; each reader gets every batch.

        A reader starts with what the track still holds (its last ``max_queued_s``), so one
        that starts at once gets the track from position 0.
        """
        backlog = self._backlog.get(track)
        queue = _Queue(self._max_samples, backlog.batches if backlog else ())
        readers = self._readers.setdefault(track, [])
        readers.append(queue)
        try:
            while True:
                while queue.batches:
                    yield queue.get()
                if self.ended:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
        finally:
            readers.remove(queue)

    def _put(self, batch: AudioBatch) -> None:
        backlog = self._backlog.setdefault(batch.track, _Queue(self._max_samples))
        dropped = backlog.put(batch)
        readers = self._readers.get(batch.track, [])
        if readers:
            dropped = max(reader.put(batch) for reader in readers)
        self.dropped_batches += dropped
        self._wakeup.set()

    def _end(self, summary: StreamSummary) -> None:
        self.summary = summary
        self._wakeup.set()


class LiveAudio:
    """A source of ``LiveStream``s fed by a sink; see the module docstring."""

    def __init__(self, *, max_queued_s: float = 10.0, max_pending_streams: int = 1000) -> None:
        self.max_queued_s = max_queued_s
        self._pending: asyncio.Queue[LiveStream] = asyncio.Queue(max_pending_streams)

    def sink(self, name: str = "live") -> tuple[str, SinkFactory]:
        """The ``(name, factory)`` pair to list in ``Receiver(sink_factories=...)``."""
        return name, self._make_sink

    async def streams(self) -> AsyncIterator[LiveStream]:
        """Every stream that starts, as it starts."""
        while True:
            yield await self._pending.get()

    def _make_sink(self, settings: Settings) -> _LiveSink:
        return _LiveSink(self)


class _LiveSink:
    """The sink side: copies batches into the stream's queues (sinks must not keep views)."""

    location: str | None = None
    writes_record = False

    def __init__(self, source: LiveAudio) -> None:
        self._source = source
        self._stream: LiveStream | None = None

    def open(self, info: StreamInfo) -> None:
        self._stream = LiveStream(info, max_queued_s=self._source.max_queued_s)
        self._source._pending.put_nowait(self._stream)  # full: raises, the Fanout reports it

    def write(self, track: Track, position: int, samples: NDArray[np.int16]) -> None:
        assert self._stream is not None
        self._stream._put(AudioBatch(track, position, samples.copy()))

    def event(self, record: DtmfRecord | MarkRecord) -> None:
        assert self._stream is not None
        self._stream.events.append(record)

    def close(self, summary: StreamSummary) -> None:
        if self._stream is not None:
            self._stream._end(summary)
