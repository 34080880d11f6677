"""Per-stream bounds end to end: a real receiver over TLS, a client sending past each bound,
``stream.json`` and the counters read back (see ``test_session.py`` for the placement bounds)."""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from receiver.codecs import CLI_CODECS, codec_for
from receiver.simulate import build_messages
from tests.support.audio import read_wav
from tests.support.receiver import TOKEN, StartReceiver, url, wait_idle

PCMU = codec_for(CLI_CODECS["pcmu"])


async def send(target: str, context: ssl.SSLContext, frames: list[str]) -> int | None:
    """Send every frame, then wait for the server's close; its close code."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(target, ssl=context, additional_headers=headers) as ws:
        for frame in frames:
            await ws.send(frame)
        await ws.wait_closed()
    return ws.close_code


async def test_marks_dtmf_and_unknown_events_past_their_bounds_are_counted_and_dropped(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """Past RECEIVER_MAX_MARKS / _MAX_DTMF / _MAX_UNKNOWN_EVENTS nothing more is kept: the
    counts are in stream.json's "dropped", one log line each, counters; audio is whole."""
    receiver = await start_receiver(
        max_marks=5, max_dtmf=3, max_name_chars=16, max_unknown_events=2
    )
    audio = (np.arange(8000) % 200 - 100).astype(np.int16)
    messages = build_messages(codec=PCMU, tracks={"inbound": PCMU.encode(audio)}, stream_sid="lim")
    marks = [json.dumps({"event": "mark", "mark": {"name": f"m{i}" + "x" * i}}) for i in range(9)]
    dtmf = [json.dumps({"event": "dtmf", "dtmf": {"digit": "5"}}) for _ in range(7)]
    unknown = [json.dumps({"event": f"odd{i % 4}" + "y" * 40}) for i in range(8)]
    frames = [*messages[:12], *marks, *dtmf, *unknown, *messages[12:]]
    with caplog.at_level(logging.INFO, logger="receiver"):
        assert await send(url(receiver), client_ssl, frames) == 1000
        await wait_idle(receiver)
    directory = receiver.settings.recordings_dir / "lim"
    record = json.loads((directory / "stream.json").read_text())
    assert [m["name"] for m in record["marks"]] == ["m0", "m1x", "m2xx", "m3xxx", "m4xxxx"]
    assert len(record["dtmf"]) == 3
    assert record["unknown_events"] == ["odd0" + "y" * 12, "odd1" + "y" * 12]
    assert record["dropped"] == {
        "marks": 4,
        "dtmf": 4,
        "mark_names_cut": 0,
        "unknown_event_names": 4,  # odd2, odd3, odd2, odd3: not listed, only counted
    }
    assert record["end"] == {"kind": "stop", "close_code": 1000, "reason": None}
    samples, _ = read_wav(directory / "inbound.wav")
    np.testing.assert_array_equal(samples, PCMU.decode(PCMU.encode(audio)))
    counters = receiver.counters
    assert (counters["dropped", "marks"], counters["dropped", "dtmf"]) == (4, 4)
    assert counters["dropped", "unknown_event_names"] == 4
    lines = [r.getMessage() for r in caplog.records]
    warnings = [line for line in lines if "counted in stream.json" in line]
    assert sorted(warnings) == [
        "dtmf past 3 a stream: counted in stream.json, dropped",
        "marks past 5 a stream: counted in stream.json, dropped",
        "unknown_event_names past 2 a stream: counted in stream.json, dropped",
    ]


async def test_long_mark_names_are_cut_and_counted(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """A mark name over RECEIVER_MAX_NAME_CHARS keeps its place, its name cut, and is counted."""
    receiver = await start_receiver(max_name_chars=10)
    messages = build_messages(codec=PCMU, tracks={"inbound": b"\xff" * 1600}, stream_sid="names")
    long_mark = json.dumps({"event": "mark", "mark": {"name": "n" * 60_000}})
    assert await send(url(receiver), client_ssl, [*messages[:-1], long_mark, messages[-1]]) == 1000
    await wait_idle(receiver)
    record = json.loads((receiver.settings.recordings_dir / "names" / "stream.json").read_text())
    assert record["marks"] == [{"name": "n" * 10, "at_ms": 200.0}]
    assert record["dropped"]["mark_names_cut"] == 1
    assert receiver.counters["dropped", "mark_names_cut"] == 1


async def test_a_chunk_jump_makes_at_most_max_gap_of_silence(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """One frame with chunk 1 -> 1,000,000 and no timestamp: max_gap_s of silence, counted as a
    clock jump; the frames after it follow on."""
    receiver = await start_receiver(max_gap_s=2)

    def media(chunk: int, fill: int) -> str:
        payload = PCMU.encode(np.full(160, fill, dtype=np.int16))
        body = {"track": "inbound", "chunk": str(chunk), "payload": _b64(payload)}
        return json.dumps({"event": "media", "media": body})

    start = build_messages(codec=PCMU, tracks={"inbound": b""}, stream_sid="jump")
    frames = [start[0], start[1], media(1, 1000), media(1_000_000, 2000), media(1_000_001, 3000)]
    assert await send(url(receiver), client_ssl, [*frames, start[-1]]) == 1000
    await wait_idle(receiver)
    directory = receiver.settings.recordings_dir / "jump"
    samples, _ = read_wav(directory / "inbound.wav")
    assert len(samples) == 3 * 160 + 2 * 8000
    assert not samples[160 : 160 + 16000].any()
    np.testing.assert_array_equal(
        samples[16160:16320], PCMU.decode(PCMU.encode(np.full(160, 2000, dtype=np.int16)))
    )
    stats = json.loads((directory / "stream.json").read_text())["tracks"]["inbound"]
    assert (stats["clock_jumps"], stats["silence_samples"]) == (1, 16000)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


async def test_a_long_gap_costs_the_wav_file_no_disk(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """A 60 s gap is a hole in the WAV file (reads as zeros, takes no blocks), not 960 KB of
    zeros written on the event loop."""
    receiver = await start_receiver()
    frames = build_messages(codec=PCMU, tracks={"inbound": b"\x12" * 320}, stream_sid="hole")
    late = json.loads(frames[3])
    late["media"]["timestamp"] = "60020"
    late["media"]["chunk"] = "3001"
    assert (
        await send(url(receiver), client_ssl, [*frames[:3], json.dumps(late), frames[-1]]) == 1000
    )
    await wait_idle(receiver)
    path = receiver.settings.recordings_dir / "hole" / "inbound.wav"
    samples, _ = read_wav(path)
    assert len(samples) == 160 + 60 * 8000 + 160
    assert not samples[160:-160].any() and samples[-160:].all()
    assert path.stat().st_blocks * 512 < 64 * 1024 < path.stat().st_size


async def test_stop_records_the_close_code_1000(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """After stop, stream.json's end names the connection's close code, 1000."""
    receiver = await start_receiver()
    messages = build_messages(codec=PCMU, tracks={"inbound": b"\xff" * 800}, stream_sid="code")
    assert await send(url(receiver), client_ssl, messages) == 1000
    await wait_idle(receiver)
    record: dict[str, Any] = json.loads(
        (receiver.settings.recordings_dir / "code" / "stream.json").read_text()
    )
    assert record["end"] == {"kind": "stop", "close_code": 1000, "reason": None}
