"""The receiver's own per-frame cost, without network: parse, place, decode, write.

    python -m bench.core [--frames 20000]

Prints microseconds per frame for the whole core (protocol + session + wav sink) and, in the
same run, the alternatives the code chose against, as ratios: websockets' frame parser against
``receiver.frames``, json.loads with checks and base64 in Python against msgspec's one call, a
frozen dataclass event against the NamedTuple, and libsndfile's write and header update against
``Pcm16Wav`` (40 files written in turn, as 20 both-track streams do).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import tempfile
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile
from websockets.protocol import Protocol, Side, State

from bench.loadgen import media_frames
from receiver.codecs import CLI_CODECS, codec_for
from receiver.events import Media, Start
from receiver.frames import TextFrames
from receiver.protocol import StreamProtocol
from receiver.session import Session
from receiver.simulate import build_messages
from receiver.sinks import Fanout, StreamInfo, WavSink
from receiver.sinks.wav import Pcm16Wav, update_header

PCMU = codec_for(CLI_CODECS["pcmu"])


@dataclass(frozen=True, slots=True)
class FrozenMedia:
    """What Media was before it became a NamedTuple, for the comparison."""

    track: str
    payload: bytes
    chunk: int | None = None
    timestamp_ms: int | None = None
    sequence_number: int | None = None


def per_call_us(fn: object, number: int) -> float:
    return timeit.timeit(fn, number=number) / number * 1e6  # type: ignore[arg-type]


def core(messages: list[str], directory: Path) -> float:
    """Microseconds per media frame through protocol, session and the wav sink."""
    protocol = StreamProtocol()
    session: Session | None = None
    fanout: Fanout | None = None
    frames = 0
    started = timeit.default_timer()
    for message in messages:
        event = protocol.receive(message)
        if isinstance(event, Media):
            assert session is not None and fanout is not None
            frames += 1
            for batch in session.media(event):
                fanout.write(batch.track, batch.position, batch.samples)
        elif isinstance(event, Start):
            session = Session(event, codec=PCMU)
            fanout = Fanout(
                [("wav", WavSink(recordings_dir=directory))], logger=logging.getLogger()
            )
            fanout.open(
                StreamInfo(
                    start=event,
                    path="/",
                    query="",
                    remote=None,
                    started_at=datetime.now(UTC),
                    codec=PCMU,
                )
            )
    assert session is not None and fanout is not None
    for batch in session.flush():
        fanout.write(batch.track, batch.position, batch.samples)
    return (timeit.default_timer() - started) / frames * 1e6


def session_paths(messages: list[str]) -> tuple[float, float, float]:
    """Microseconds per steady media frame in ``Session.media``: its fast path (C), the same
    with the fast path's Python twin, and its general path alone (the fast path's state
    cleared before each frame)."""
    from receiver import session as session_module

    protocol = StreamProtocol()
    events = [protocol.receive(message) for message in messages]
    start = next(event for event in events if isinstance(event, Start))
    media = [event for event in events if isinstance(event, Media)]

    def run(general: bool) -> float:
        session = Session(start, codec=PCMU)
        clocks = session._tracks.values()
        started = timeit.default_timer()
        for event in media:
            if general:
                for clock in clocks:
                    clock.next_chunk = None
            session.media(event)
        return (timeit.default_timer() - started) / len(media) * 1e6

    fast = min(run(False) for _ in range(3))
    steady = session_module._steady
    session_module._steady = session_module._steady_python
    try:
        python = min(run(False) for _ in range(3))
    finally:
        session_module._steady = steady
    return fast, python, min(run(True) for _ in range(3))


def place_paths(messages: list[str]) -> tuple[float, float]:
    """Microseconds per media frame parsed and placed (batches decoded, not written):
    ``StreamProtocol.receive`` then ``Session.media`` a frame, and ``Session.place_run`` over
    the list (the general path for what it leaves), as the recording does."""
    start = next(m for m in messages if '"start"' in m)
    media = [m for m in messages if '"media"' in m]

    def run(in_c: bool) -> float:
        protocol = StreamProtocol()
        event = protocol.receive(start)
        assert isinstance(event, Start)
        session = Session(event, codec=PCMU)
        started = timeit.default_timer()
        i = 0
        while i < len(media):
            end, _ = session.place_run(media, i) if in_c else (i, ())
            if end == i:
                frame = protocol.receive(media[i])
                assert isinstance(frame, Media)
                session.media(frame)
                end = i + 1
            i = end
        return (timeit.default_timer() - started) / len(media) * 1e6

    return min(run(False) for _ in range(3)), min(run(True) for _ in range(3))


def frame_parsers(frames: int) -> tuple[float, float]:
    """Microseconds per masked media frame, in 32 KiB reads: websockets' parser, TextFrames."""
    stream = b"".join(media_frames(frames // 2))
    reads = [stream[i : i + 32768] for i in range(0, len(stream), 32768)]

    def websockets_parse() -> None:
        protocol = Protocol(Side.SERVER, state=State.OPEN, max_size=65536)
        for data in reads:
            protocol.receive_data(data)
            protocol.events_received()

    def split() -> None:
        splitter = TextFrames(max_size=65536)
        for data in reads:
            splitter.feed(data)

    return per_call_us(websockets_parse, 5) / frames, per_call_us(split, 5) / frames


def speedups(frame: str, frames: int) -> tuple[float, float, float, float, float, float]:
    """Microseconds, C then Python: per media frame, the splitter (32 KiB reads) and the
    parser; per 200 ms batch, the G.711 decode."""
    from receiver import _speedups
    from receiver.codecs import _MULAW_DECODE, _take_c, _take_python
    from receiver.frames import _split_python
    from receiver.protocol import _python_fast_media

    batch = bytes(range(256)) * 6 + bytes(64)  # 1,600 samples: 200 ms at 8 kHz
    each = media_frames(frames // 2)
    per_read = 32768 // len(each[0])  # whole frames a read: each read starts on a frame
    reads = [b"".join(each[i : i + per_read]) for i in range(0, len(each), per_read)]

    def splitting(split: Callable[..., tuple[int, bool]]) -> float:
        def run() -> None:
            for data in reads:
                split(data, 65536, [], [])

        return per_call_us(run, 5) / frames

    n = 100_000
    return (
        splitting(_speedups.split_frames),
        splitting(_split_python),
        per_call_us(lambda: _speedups.media(frame, Media), n),
        per_call_us(lambda: _python_fast_media(frame), n),
        per_call_us(lambda: _take_c(batch, _MULAW_DECODE), n),
        per_call_us(lambda: _take_python(batch, _MULAW_DECODE), n),
    )


def wav_writers(directory: Path, files: int = 40, batches: int = 300) -> tuple[float, float]:
    """Microseconds per 200 ms batch over ``files`` files in turn: libsndfile, Pcm16Wav."""
    samples = (np.arange(1600) % 200).astype(np.int16)
    sndfiles = [
        soundfile.SoundFile(directory / f"s{i}.wav", "w", 8000, 1, "PCM_16", format="WAV")
        for i in range(files)
    ]
    started = timeit.default_timer()
    for _ in range(batches):
        for file in sndfiles:
            file.buffer_write(samples, dtype="int16")
            update_header(file)
    libsndfile = (timeit.default_timer() - started) / (files * batches) * 1e6
    for file in sndfiles:
        file.close()
    own = [Pcm16Wav(directory / f"p{i}.wav", sample_rate_hz=8000) for i in range(files)]
    started = timeit.default_timer()
    for _ in range(batches):
        for writer in own:
            writer.append(samples)
    pcm16 = (timeit.default_timer() - started) / (files * batches) * 1e6
    for writer in own:
        writer.close()
    return libsndfile, pcm16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20_000)
    args = parser.parse_args()
    audio = PCMU.encode(np.zeros(160 * args.frames // 2, dtype=np.int16))
    messages = build_messages(
        codec=PCMU, tracks={"inbound": audio, "outbound": audio}, stream_sid="core"
    )
    with tempfile.TemporaryDirectory() as tmp:
        whole = min(
            core(messages, Path(tmp) / str(i))
            for i in range(3)
            if (Path(tmp) / str(i)).mkdir() is None
        )
    frame = messages[10]
    protocol = StreamProtocol()
    protocol.receive(messages[1])
    payload = json.loads(frame)["media"]["payload"]
    n = 100_000
    receive = per_call_us(lambda: protocol.receive(frame), n)

    def stdlib_parse() -> object:
        body = json.loads(frame)["media"]
        return (
            body["track"],
            binascii.a2b_base64(body["payload"], strict_mode=True),
            int(body["chunk"]),
            int(body["timestamp"]),
        )

    stdlib = per_call_us(stdlib_parse, n)
    named = per_call_us(lambda: Media("inbound", b"", 1, 2, 3), n)
    new_tuple = per_call_us(lambda: tuple.__new__(Media, ("inbound", b"", 1, 2, 3)), n)
    fast_path, python_fast_path, general_path = session_paths(messages)
    per_frame, in_run = place_paths(messages)
    frozen = per_call_us(lambda: FrozenMedia("inbound", b"", 1, 2, 3), n)
    samples = np.zeros(1600, dtype=np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        file = soundfile.SoundFile(Path(tmp) / "w.wav", "w", 8000, 1, "PCM_16", format="WAV")
        checked = per_call_us(lambda: file.write(samples), 5000)
        raw = per_call_us(lambda: file.buffer_write(samples, dtype="int16"), 5000)
        file.close()
        libsndfile, pcm16 = wav_writers(Path(tmp))
    websockets_frame, split_frame = frame_parsers(4000)
    c_split, python_split, c_media, python_media, c_g711, numpy_g711 = speedups(frame, 4000)
    decode = per_call_us(lambda: base64.b64decode(payload), n)
    print(f"core (protocol + session + wav sink): {whole:.2f} us/frame (best of 3)")
    print(
        f"frame parsing, media frame: websockets {websockets_frame:.2f} us; TextFrames "
        f"{split_frame:.2f} us; ratio {websockets_frame / split_frame:.2f}"
    )
    print(
        f"receiver._speedups (C) against its Python twins, media frame: split {c_split:.3f} "
        f"us vs {python_split:.3f} us, ratio {python_split / c_split:.1f}; parse "
        f"{c_media:.3f} us vs {python_media:.3f} us, ratio {python_media / c_media:.1f}; "
        f"G.711 decode, 200 ms batch: {c_g711:.2f} us vs numpy's take {numpy_g711:.2f} us, "
        f"ratio {numpy_g711 / c_g711:.1f}"
    )
    print(
        f"StreamProtocol.receive, media frame: {receive:.2f} us; json.loads + checks + "
        f"base64: {stdlib:.2f} us; ratio {stdlib / receive:.2f}"
    )
    print(
        f"Media NamedTuple: {named:.2f} us; frozen dataclass: {frozen:.2f} us; "
        f"ratio {frozen / named:.2f}; tuple.__new__(Media, ...): {new_tuple:.2f} us, "
        f"ratio {named / new_tuple:.2f}"
    )
    print(
        f"Session.media, steady frame: fast path {fast_path:.2f} us (its Python twin "
        f"{python_fast_path:.2f} us, ratio {python_fast_path / fast_path:.2f}); general path "
        f"{general_path:.2f} us; ratio {general_path / fast_path:.2f}"
    )
    print(
        f"parse and place a media frame: receive + Session.media {per_frame:.2f} us; "
        f"Session.place_run {in_run:.2f} us; ratio {per_frame / in_run:.2f}"
    )
    print(
        f"200 ms batch to WAV: buffer_write {raw:.2f} us; write {checked:.2f} us; "
        f"ratio {checked / raw:.2f}"
    )
    print(
        f"200 ms batch to WAV, 40 files in turn: libsndfile write + header {libsndfile:.2f} us; "
        f"Pcm16Wav {pcm16:.2f} us; ratio {libsndfile / pcm16:.2f}"
    )
    print(f"(base64 of one frame alone: {decode:.2f} us)")


if __name__ == "__main__":
    main()
