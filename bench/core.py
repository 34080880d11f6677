"""The receiver's own per-frame cost, without network: parse, place, decode, write.

    python -m bench.core [--frames 20000]

Prints microseconds per frame for the whole core (protocol + session + wav sink) and, in the
same run, the alternatives the code chose against, as ratios: json.loads with checks and base64
in Python against msgspec's one call, a frozen dataclass event against the NamedTuple, and
soundfile's checked write against buffer_write.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import tempfile
import timeit
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile

from receiver.codecs import CLI_CODECS, codec_for
from receiver.events import Media, Start
from receiver.protocol import StreamProtocol
from receiver.session import Session
from receiver.simulate import build_messages
from receiver.sinks import Fanout, StreamInfo, WavSink

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
    frozen = per_call_us(lambda: FrozenMedia("inbound", b"", 1, 2, 3), n)
    samples = np.zeros(1600, dtype=np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        file = soundfile.SoundFile(Path(tmp) / "w.wav", "w", 8000, 1, "PCM_16", format="WAV")
        checked = per_call_us(lambda: file.write(samples), 5000)
        raw = per_call_us(lambda: file.buffer_write(samples, dtype="int16"), 5000)
        file.close()
    decode = per_call_us(lambda: base64.b64decode(payload), n)
    print(f"core (protocol + session + wav sink): {whole:.2f} us/frame (best of 3)")
    print(
        f"StreamProtocol.receive, media frame: {receive:.2f} us; json.loads + checks + "
        f"base64: {stdlib:.2f} us; ratio {stdlib / receive:.2f}"
    )
    print(
        f"Media NamedTuple: {named:.2f} us; frozen dataclass: {frozen:.2f} us; "
        f"ratio {frozen / named:.2f}"
    )
    print(
        f"200 ms batch to WAV: buffer_write {raw:.2f} us; write {checked:.2f} us; "
        f"ratio {checked / raw:.2f}"
    )
    print(f"(base64 of one frame alone: {decode:.2f} us)")


if __name__ == "__main__":
    main()
