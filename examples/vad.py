"""Energy-based voice activity detection on live streams, in the receiver's own process.

Run it like ``receiver serve`` (same RECEIVER_* settings): it records as usual and prints, per
track, each stretch of speech as it ends::

    python examples/vad.py
    [MZ1234] inbound speech 0.46 s - 2.10 s

The detector is deliberately simple: 20 ms windows, speech when a window's level is above
``threshold_dbfs``, with a hangover so that short pauses inside a phrase do not split it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from receiver import AudioBatch, LiveAudio, LiveStream


@dataclass
class SpeechDetector:
    """Finds speech segments (start_s, end_s) in a track's batches."""

    rate: int
    threshold_dbfs: float = -40.0
    hangover_s: float = 0.3
    window_s: float = 0.02
    segments: list[tuple[float, float]] = field(default_factory=list)
    _start: float | None = None
    _last_voiced: float = 0.0
    _carry: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int16))
    _position: int = 0

    def feed(self, samples: np.ndarray) -> list[tuple[float, float]]:
        """Add samples; return the segments that ended in them."""
        window = int(self.rate * self.window_s)
        data = np.concatenate([self._carry, samples])
        whole = len(data) // window * window
        self._carry = data[whole:]
        ended = []
        for frame in data[:whole].reshape(-1, window):
            t = self._position / self.rate
            self._position += window
            rms = math.sqrt(float(np.mean(frame.astype(np.float64) ** 2)))
            voiced = rms > 0 and 20 * math.log10(rms / 32768) > self.threshold_dbfs
            if voiced:
                if self._start is None:
                    self._start = t
                self._last_voiced = t + self.window_s
            elif self._start is not None and t - self._last_voiced >= self.hangover_s:
                ended.append((round(self._start, 2), round(self._last_voiced, 2)))
                self._start = None
        self.segments.extend(ended)
        return ended

    def finish(self) -> list[tuple[float, float]]:
        """Close a segment still open at the end of the stream."""
        if self._start is None:
            return []
        segment = (round(self._start, 2), round(self._last_voiced, 2))
        self._start = None
        self.segments.append(segment)
        return [segment]


async def speech_segments(stream: LiveStream, track: str) -> AsyncIterator[tuple[float, float]]:
    """Speech segments of one track of a live stream, as each one ends."""
    rate = stream.info.codec.sample_rate_hz if stream.info.codec else 8000
    detector = SpeechDetector(rate)
    batch: AudioBatch
    async for batch in stream.audio(track):  # type: ignore[arg-type]
        for segment in detector.feed(batch.samples):
            yield segment
    for segment in detector.finish():
        yield segment


async def report(stream: LiveStream) -> None:
    """Print every track's speech segments of one stream."""

    async def one(track: str) -> None:
        async for start, end in speech_segments(stream, track):
            sid = stream.info.start.stream_sid
            print(f"[{sid}] {track} speech {start:.2f} s - {end:.2f} s", flush=True)

    await asyncio.gather(*(one(t) for t in stream.info.start.tracks or ["inbound"]))


async def main() -> None:
    """Serve with the wav sink and the live VAD side by side."""
    from receiver import Receiver, load_settings
    from receiver.cli import _server_tls, check_recordings_dir
    from receiver.logs import setup_logging
    from receiver.sinks import sink_factories_for

    settings = load_settings()
    if not settings.tokens:
        raise SystemExit("set RECEIVER_TOKENS: the bearer token(s) the platform will send")
    setup_logging(level=settings.log_level, log_format=settings.log_format)
    check_recordings_dir(settings.recordings_dir)  # creates it, as `receiver serve` does
    live = LiveAudio()
    factories = [*sink_factories_for(settings), live.sink()]
    receiver = Receiver(settings, ssl_context=_server_tls(settings), sink_factories=factories)
    await receiver.start()
    print(f"VAD listening on port {receiver.port}", flush=True)
    tasks = set()
    async for stream in live.streams():
        task = asyncio.create_task(report(stream))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


if __name__ == "__main__":
    asyncio.run(main())
