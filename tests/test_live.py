"""The in-process live audio API, and the VAD example built on it."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import sys
from pathlib import Path
from typing import Any

import numpy as np

from receiver.codecs import CLI_CODECS, codec_for
from receiver.live import LiveAudio, LiveStream
from receiver.simulate import build_messages, play
from receiver.sinks import WavSink
from tests.support.audio import read_wav
from tests.support.receiver import TOKEN, StartReceiver, url

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from vad import speech_segments

PCMU = codec_for(CLI_CODECS["pcmu"])


async def test_live_audio_matches_the_recording_and_vad_finds_the_phrases(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, speech: Any
) -> None:
    """`async for batch in stream.audio(track)` yields what the WAV holds; the VAD example
    finds the 1.5 s pause between two phrases."""
    # The client sends faster than real time, so all ~12 s may arrive before the readers'
    # tasks first run; a backlog longer than the stream keeps position 0 for them.
    live = LiveAudio(max_queued_s=60.0)
    receiver = await start_receiver(sink_factories=[("wav", WavSink.from_settings), live.sink()])
    phrase = speech["inbound"].samples(8000)
    pause = np.zeros(12_000, dtype=np.int16)
    audio = np.concatenate([phrase, pause, phrase])
    messages = build_messages(codec=PCMU, tracks={"inbound": PCMU.encode(audio)}, stream_sid="live")

    async def consume() -> tuple[Any, list[tuple[float, float]], LiveStream]:
        stream = await anext(aiter(live.streams()))
        chunks, segments = [], []

        async def audio() -> None:
            async for batch in stream.audio("inbound"):
                chunks.append(batch)

        async def vad() -> None:
            async for segment in speech_segments(stream, "inbound"):
                segments.append(segment)

        await asyncio.gather(audio(), vad())
        return chunks, segments, stream

    consumer = asyncio.create_task(consume())
    result = await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    assert result.close_code == 1000
    chunks, segments, stream = await asyncio.wait_for(consumer, 10)
    recorded, _ = read_wav(receiver.settings.recordings_dir / "live" / "inbound.wav")
    positions = [c.position for c in chunks]
    assert positions == sorted(positions) and positions[0] == 0
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), recorded)
    assert stream.summary is not None and stream.summary.end.kind == "stop"
    assert stream.dropped_batches == 0
    # Each phrase is two sentences; the widest pause between segments is the 1.5 s we put in.
    phrase_s = len(phrase) / 8000
    assert 2 <= len(segments) <= 6, segments
    gaps = [(b[0] - a[1], a[1], b[0]) for a, b in itertools.pairwise(segments)]
    widest, pause_start, pause_end = max(gaps)
    assert widest >= 1.2, segments
    assert phrase_s - 0.5 <= pause_start <= phrase_s + 0.05
    assert phrase_s + 1.5 - 0.05 <= pause_end <= phrase_s + 1.5 + 0.5


async def test_slow_consumer_drops_oldest_not_the_receiver(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """A consumer that reads nothing keeps at most max_queued_s; the recording is whole."""
    live = LiveAudio(max_queued_s=1.0)
    receiver = await start_receiver(sink_factories=[("wav", WavSink.from_settings), live.sink()])
    audio = PCMU.encode(np.full(5 * 8000, 500, dtype=np.int16))
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="slow")
    assert (
        await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    ).close_code == 1000
    stream = await anext(aiter(live.streams()))
    kept = [batch async for batch in stream.audio("inbound")]
    assert sum(len(b.samples) for b in kept) <= 8000 + 1600
    assert stream.dropped_batches >= 15
    assert kept[-1].position + len(kept[-1].samples) == 5 * 8000
    recorded, _ = read_wav(receiver.settings.recordings_dir / "slow" / "inbound.wav")
    assert len(recorded) == 5 * 8000
