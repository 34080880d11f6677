"""The C twins of the hot path's loops (receiver/_speedups.c) against their Python references:
the same frames split from any bytes; for a media message, either the same Media or None (the
Python path decides), never a different answer; the same samples from a G.711 table."""

from __future__ import annotations

import base64
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

# Imported plainly: a build without the C extension fails here, loudly (scripts/test installs
# with a compiler, so the suite tests the loops that are deployed).
from receiver import _speedups as speedups
from receiver import codecs, frames, protocol
from receiver import session as session_module
from receiver.events import Media, MediaFormat, Start
from receiver.simulate import build_messages
from tests.support.fuzzing import fuzz
from tests.support.strategies import SPLIT_MAX_SIZE, client_frame, media_msg
from tests.test_recording import PCMU, stream

PLATFORM_FRAME = (
    '{"event":"media","sequenceNumber":"4","media":{"track":"inbound","chunk":"2",'
    '"timestamp":"20","payload":"' + base64.b64encode(bytes(range(160))).decode() + '"},'
    '"streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0"}'
)


def test_the_c_build_is_in_use() -> None:
    """The server's modules use the C loops: the end-to-end tests run the code deployed."""
    assert frames.split_frames is speedups.split_frames
    assert protocol._c_media is speedups.media
    assert codecs._take is codecs._take_c
    assert session_module._steady is speedups.steady
    assert session_module._place_run is speedups.place_run


def test_serve_warns_when_the_c_build_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from receiver import cli

    cli._check_speedups()
    assert not caplog.records
    monkeypatch.setitem(sys.modules, "receiver._speedups", None)  # import raises ImportError
    cli._check_speedups()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "receiver._speedups is not built" in caplog.text


def both_splits(buffer: bytes, max_size: int) -> tuple[Any, Any]:
    results = []
    for split in (speedups.split_frames, frames._split_python):
        messages: list[str] = []
        control: list[bytes] = []
        position, foreign = split(buffer, max_size, messages, control)
        results.append((position, foreign, messages, control))
    return results[0], results[1]


@given(
    st.lists(client_frame(), max_size=10),
    st.integers(0, 2**16),
    st.sampled_from([SPLIT_MAX_SIZE, 0, 125, 126, 1 << 20]),
    st.binary(max_size=16),
)
@fuzz
def test_the_c_splitter_splits_as_the_python_one(
    frame_list: list[bytes], cut: int, max_size: int, noise: bytes
) -> None:
    """Any frames (right and wrong), cut anywhere, with any bytes after: the same messages,
    control frames, stopping place and reason, from bytes and from a bytearray."""
    stream = b"".join(frame_list)
    stream = stream[: cut % (len(stream) + 1)] if cut % 3 == 0 else stream + noise
    c, python = both_splits(stream, max_size)
    assert c == python
    assert both_splits(bytearray(stream), max_size)[0] == python  # type: ignore[arg-type]


def test_the_c_splitter_reads_64_bit_lengths_and_non_ascii_text() -> None:
    text = "é" * 40_000  # 80,000 bytes: a 64-bit length
    mask = b"\x01\x02\x03\x04"
    data = text.encode()
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    frame = b"\x81\xff" + len(data).to_bytes(8, "big") + mask + masked
    c, python = both_splits(frame + b"\x81", 1 << 20)
    assert c == python == (len(frame), False, [text], [])
    c, python = both_splits(frame, len(data) - 1)  # too big: websockets' 1009
    assert c == python == (0, True, [], [])


def c_media(text: str) -> Media | None:
    media: Media | None = speedups.media(text, Media)
    return media


def test_the_platform_frame_takes_the_c_path() -> None:
    media = c_media(PLATFORM_FRAME)
    assert type(media) is Media
    assert media == protocol._python_fast_media(PLATFORM_FRAME)
    assert media == Media("inbound", bytes(range(160)), 2, 20, 4)


@pytest.mark.parametrize(
    "change",
    [
        ('"track":"inbound"', '"track":"in\\u0062ound"'),  # an escape
        ('"chunk":"2"', '"chunk":2'),  # a JSON number
        ('"chunk":"2"', '"chunk":"1234567890123456"'),  # 16 digits
        ('"chunk":"2"', '"chunk":""'),
        ('"chunk":"2"', '"chunk":"-2"'),
        ('"chunk":"2",', ""),  # no chunk
        ('"sequenceNumber":"4",', ""),
        ('"event":"media"', '"event":"dtmf"'),
        ('"track":"inbound"', '"track":"both"'),
        ('"track":"inbound"', '"track":"inbound","track":"outbound"'),  # repeated
        ('"streamSid":"MZ', '"streamSid":"é'),  # not ASCII
        ('"streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0"', '"streamSid":null'),
        ('"streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0"', '"rawEvent":{}'),
        ('"payload":"AAEC', '"payload":"AAE'),  # not a multiple of four
        ('"payload":"AAEC', '"payload":"AA=C'),
        ('"payload":"AAEC', '"payload":"AAE\\n'),
    ],
)
def test_what_is_not_plain_is_left_to_the_python_path(change: tuple[str, str]) -> None:
    text = PLATFORM_FRAME.replace(*change, 1)
    assert text != PLATFORM_FRAME
    assert c_media(text) is None


@pytest.mark.parametrize("tail", ["x", "}", ",", " ]"])
def test_trailing_text_is_left_to_the_python_path(tail: str) -> None:
    assert c_media(PLATFORM_FRAME + tail) is None


@pytest.mark.parametrize(
    ("payload", "decoded"),
    [("", b""), ("AA==", b"\x00"), ("AAA=", b"\x00\x00"), ("/+8=", b"\xff\xef"), ("QQ==", b"A")],
)
def test_canonical_base64(payload: str, decoded: bytes) -> None:
    text = PLATFORM_FRAME.replace(base64.b64encode(bytes(range(160))).decode(), payload)
    media = c_media(text)
    assert media is not None and media.payload == decoded
    assert media == protocol._python_fast_media(text)


@pytest.mark.parametrize("payload", ["QR==", "QUJ=", "AB=="])
def test_base64_with_unused_bits_set_is_left_to_the_python_path(payload: str) -> None:
    text = PLATFORM_FRAME.replace(base64.b64encode(bytes(range(160))).decode(), payload)
    assert c_media(text) is None


def serialized(draw: st.DrawFn, obj: Any) -> str:
    """JSON as any sender may write it: key order, spacing, ASCII escapes or not."""
    if isinstance(obj, dict) and draw(st.booleans()):
        obj = dict(draw(st.permutations(list(obj.items()))))
    space = draw(st.sampled_from(["", " ", "\n", "\t ", "\r\n"]))
    return json.dumps(
        obj,
        ensure_ascii=draw(st.booleans()),
        separators=(space + "," + space, space + ":" + space),
    )


_DIGIT_TEXT = st.text("0123456789", min_size=1, max_size=15)
DIGITS = _DIGIT_TEXT | _DIGIT_TEXT | st.sampled_from(["", "00", "-1", "1234567890123456"])
PLAIN_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')
_PLAIN_TEXT = st.text(PLAIN_CHARS, max_size=8)
SIMPLE = _PLAIN_TEXT | _PLAIN_TEXT | _PLAIN_TEXT | st.text(max_size=4)


@st.composite
def platform_media(draw: st.DrawFn) -> dict[str, Any]:
    """The platform's frame with its values drawn: mostly the C path's plain form."""
    payload = base64.b64encode(draw(st.binary(max_size=400))).decode()
    if draw(st.integers(0, 9)) == 0:
        payload = draw(st.sampled_from(["QR==", "QUJ=", "A===", "====", "QQ", "QQ=="]))
    body: dict[str, Any] = {
        "track": draw(st.sampled_from(["inbound", "outbound", "inbound_track", "outbound_track"])),
        "chunk": draw(DIGITS),
        "timestamp": draw(DIGITS),
        "payload": payload,
        **draw(st.dictionaries(SIMPLE, SIMPLE, max_size=1)),
    }
    obj: dict[str, Any] = {
        "event": "media",
        "sequenceNumber": draw(DIGITS),
        "media": body,
        "streamSid": draw(SIMPLE),
        **draw(st.dictionaries(SIMPLE, SIMPLE, max_size=1)),
    }
    if draw(st.integers(0, 5)) == 0:
        body.update(draw(st.dictionaries(st.sampled_from(list(body)), SIMPLE, max_size=1)))
    return obj


@st.composite
def media_texts(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        obj = draw(platform_media())
    else:
        obj = draw(st.sampled_from(["clean", "one", "many"]).flatmap(media_msg)).obj
    text = serialized(draw, obj)
    edit = draw(st.integers(0, 5))
    if edit == 0 and text:  # a character changed, dropped or doubled anywhere
        at = draw(st.integers(0, len(text) - 1))
        other = draw(st.sampled_from(["", '"', "\\", "0", "=", "}", text[at] * 2]))
        text = text[:at] + other + text[at + 1 :]
    elif edit == 1:
        text = draw(st.sampled_from([" ", "", "\n"])) + text + draw(st.sampled_from([" ", "x"]))
    return text


@given(media_texts())
@fuzz
def test_the_c_media_parser_agrees_with_the_python_one(text: str) -> None:
    """For any media-like text: None, or exactly the Media the Python fast path builds."""
    media = c_media(text)
    if media is not None:
        expected = protocol._python_fast_media(text)
        assert media == expected
        assert type(media) is Media
        assert [type(v) for v in media] == [type(v) for v in expected]  # type: ignore[union-attr]


@given(platform_media(), st.sampled_from(["", " ", "\n"]))
@fuzz
def test_the_plain_form_is_taken_by_the_c_parser(obj: dict[str, Any], space: str) -> None:
    """The platform's frame in ASCII with no escapes, its payload canonical base64: if the
    Python path takes it, so does the C path (None is not what passes the property above)."""
    text = json.dumps(obj, separators=(space + ",", ":" + space))
    expected = protocol._python_fast_media(text)
    canonical = expected is not None and (
        base64.b64encode(expected.payload).decode() == obj["media"]["payload"]
    )
    if text.isascii() and "\\" not in text and canonical:
        assert c_media(text) == expected


TABLES = {"mulaw": codecs._MULAW_DECODE, "alaw": codecs._ALAW_DECODE}


@pytest.mark.parametrize("table", TABLES.values(), ids=TABLES.keys())
@given(data=st.binary(max_size=4000), kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_the_c_table_lookup_decodes_as_numpy(table: Any, data: bytes, kind: type) -> None:
    every_byte = bytes(range(256))
    for sent in (data, every_byte + data):
        got = codecs._take_c(kind(sent), table)
        want = codecs._take_python(sent, table)
        assert got.dtype == want.dtype == np.int16
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable  # as decode promises: a new array the caller may change


def test_the_c_table_lookup_refuses_a_table_of_another_size() -> None:
    with pytest.raises(ValueError, match="256 int16"):
        speedups.lookup16(b"x", codecs._MULAW_DECODE[:255])
    with pytest.raises(TypeError):
        speedups.lookup16("text", codecs._MULAW_DECODE)


def snapshot(clock: Any) -> tuple[Any, ...]:
    """Every slot of a clock and of its stats, the pending payloads' identities too."""
    state = {name: getattr(clock, name) for name in clock.__slots__ if name != "stats"}
    state["pending"] = [id(p) for p in clock.pending]
    stats = {name: getattr(clock.stats, name) for name in clock.stats.__slots__}
    # Exact types: an int where the Python twin leaves an int (never a bool or a float).
    return tuple(state.items()), tuple(stats.items()), [type(v) for v in stats.values()]


@st.composite
def steady_cases(draw: st.DrawFn) -> tuple[Any, Media, int, int]:
    """A track's clock and a frame around the fast path's every bound (in its range)."""
    rate = draw(st.sampled_from([8000, 16000, 24000, 48000]))
    bytes_per_sample = draw(st.sampled_from([1, 2]))
    n = draw(st.sampled_from([1, 80, 160, 320, 960]))
    tolerance = draw(st.sampled_from([n // 2, max(n // 2, rate // 1000), 0, n]))
    cursor = draw(st.integers(0, 10**9) | st.integers(0, 4 * n))
    offset = draw(st.integers(-(10**6), 10**6) | st.just(0))
    steady = draw(st.booleans())  # half the cases continue the track but for one bound
    next_chunk = draw(st.integers(0, 10**12) if steady else st.none() | st.integers(0, 10**12))
    chunk = next_chunk
    if not steady:
        chunk = draw(
            st.none()
            | st.just(next_chunk)
            | st.integers(0, 10**12)
            | st.sampled_from([-1, 2**63, 10**15])  # out of the C range: the general path's
        )
    # A stamp around the cursor: within, at, and past the tolerance either side.
    d = draw(st.integers(-tolerance - 2, tolerance + 2) | st.integers(-3 * n - 2, 3 * n + 2))
    timestamp = draw(
        st.just(max(0, (cursor + offset + d) * 1000 // rate))
        | st.just(max(0, -(-(cursor + offset + d) * 1000 // rate)))
        | (st.none() | st.integers(0, 10**15) if not steady else st.nothing())
    )
    size = n * bytes_per_sample + draw(st.sampled_from([0, 0, 0, 0, 0, -1, 1]))
    # Where the stamp puts the frame: the bounds on the track's length and on the overlap with
    # the last frame are drawn at, and one past, that place.
    target = cursor if timestamp is None else timestamp * rate // 1000 - offset
    edge = st.sampled_from([target + n, target + n - 1])
    max_samples = draw(edge | st.just(2**40) | st.just(2**40) | st.integers(0, 2 * 10**9))
    clock = session_module._TrackClock(silence_left=draw(st.integers(0, 10**8)))
    clock.cursor, clock.offset, clock.next_chunk = cursor, offset, next_chunk
    delta = target - cursor
    overlap = st.sampled_from([-n - delta, 1 - n - delta])
    clock.shift = draw(overlap | overlap | st.integers(-2 * n, 2 * n))
    clock.frame_bytes = n * bytes_per_sample
    clock.frame_samples, clock.frame_tolerance = n, tolerance
    clock.pending = [bytes(clock.frame_bytes)] * draw(st.integers(0, 3))
    clock.pending_samples = n * len(clock.pending)
    clock.pending_start = draw(st.integers(0, cursor))
    stats = clock.stats
    stats.frames = draw(st.integers(0, 10**7))
    stats.bytes, stats.audio_samples = stats.frames * clock.frame_bytes, stats.frames * n
    stats.samples = cursor
    stats.last_chunk = draw(st.none() | st.integers(0, 10**12))
    stats.last_timestamp_ms = draw(st.none() | st.integers(0, 10**12))
    frame = Media("inbound", bytes(max(0, size)), chunk, timestamp)
    return clock, frame, rate, max_samples


@given(steady_cases())
@fuzz
def test_the_c_fast_path_places_as_the_python_one(case: tuple[Any, Media, int, int]) -> None:
    """From any clock, the same answer and the same clock and stats after (or none touched)."""
    clock, frame, rate, max_samples = case
    twin = copy.deepcopy(clock)
    twin.pending = list(clock.pending)  # the same payload objects: identities compare
    before = snapshot(clock)
    placed = speedups.steady(clock, frame, rate, max_samples)
    expected = session_module._steady_python(twin, frame, rate, max_samples)
    in_range = all(
        v is None or abs(v) <= 2**60 for v in (frame.chunk, frame.timestamp_ms, clock.next_chunk)
    ) and (frame.timestamp_ms is None or frame.timestamp_ms <= 2**60 // 65536)
    if in_range:
        assert placed is expected
    else:
        assert placed is False  # the general path places it, as it does any other frame
    assert snapshot(clock) == (snapshot(twin) if placed else before)
    if placed:
        assert clock.pending[-1] is frame.payload


def test_the_c_fast_path_refuses_what_is_not_its_clock() -> None:
    """Objects without the clock's slots are an error of ours, said loudly."""

    class Other:
        __slots__ = ("cursor",)

    with pytest.raises(TypeError, match="next_chunk is not a slot"):
        speedups.steady(Other(), Media("inbound", b"", 1, 1), 8000, 10)
    # The clock's type is still the one bound: a Session still places frames through it.
    pcmu = MediaFormat("audio/x-mulaw", 8000)
    s = session_module.Session(Start("MZ1", pcmu), codec=codecs.codec_for(pcmu))
    for i in range(3):
        s.media(Media("inbound", bytes(160), i + 1, i * 20))
    assert s.track_stats["inbound"].frames == 3


@pytest.mark.parametrize(
    ("delta", "shift", "max_samples", "placed"),
    [
        (0, 0, 10**9, True),
        (80, 0, 10**9, True),  # at the tolerance, either side
        (88, 0, 10**9, False),
        (-80, -79, 10**9, True),  # behind: placed while it overlaps less than a frame
        (-80, -80, 10**9, False),
        (0, 0, 1000 + 160, True),  # the track's last sample at the max duration
        (0, 0, 1000 + 159, False),
    ],
)
def test_the_c_fast_path_bounds(delta: int, shift: int, max_samples: int, placed: bool) -> None:
    """Each bound of the fast path, at it and one step past, in C and in Python."""
    results = []
    for steady in (speedups.steady, session_module._steady_python):
        clock = session_module._TrackClock(silence_left=0, cursor=1000, shift=shift)
        clock.next_chunk, clock.frame_bytes, clock.frame_samples = 7, 160, 160
        clock.frame_tolerance = 80
        frame = Media("inbound", bytes(160), 7, (1000 + delta) // 8)
        results.append((steady(clock, frame, 8000, max_samples), clock.cursor, clock.shift))
    assert results[0] == results[1]
    assert results[0][0] is placed


def plain_media(track: str, chunk: int, timestamp: int, payload: bytes, sid: str = "MZ-run") -> str:
    """The platform's media message, in the plain form the C parser takes unless ``sid``
    holds an escape."""
    media = {"track": track, "chunk": str(chunk), "timestamp": str(timestamp)}
    media["payload"] = base64.b64encode(payload).decode()
    text = json.dumps({"event": "media", "sequenceNumber": "9", "media": media, "streamSid": "@"})
    return text.replace('"@"', f'"{sid}"')


RUN_START = build_messages(codec=PCMU, tracks={}, stream_sid="MZ-run")[:2]


@st.composite
def runs(draw: st.DrawFn) -> list[str]:
    """A stream's messages after its start: mostly frames that continue their track, between
    what the run leaves to the general path (a track's first frame, a gap, a repeat, a late or
    early stamp, another length, a message not in the plain form, a mark, a digit)."""
    messages: list[str] = []
    chunk = {"inbound": 1, "outbound": 1}
    stamp = {"inbound": 0, "outbound": 0}
    steady = ["steady"] * 8
    odd = ["gap", "repeat", "jitter", "length", "escaped", "mark", "dtmf", "huge"]
    for _ in range(draw(st.integers(1, 80))):
        track = draw(st.sampled_from(["inbound", "outbound"]))
        kind = draw(st.sampled_from(steady + odd))
        size = 160
        if kind == "mark":
            messages.append(json.dumps({"event": "mark", "mark": {"name": "m"}}))
            continue
        if kind == "dtmf":
            messages.append(json.dumps({"event": "dtmf", "dtmf": {"digit": "5", "track": track}}))
            continue
        if kind == "gap":
            skipped = draw(st.integers(1, 3))
            chunk[track] += skipped
            stamp[track] += 20 * skipped
        elif kind == "repeat":
            chunk[track] -= 1
            stamp[track] -= 20
        elif kind == "jitter":
            stamp[track] += draw(st.sampled_from([-15, -11, -10, -9, 9, 10, 11, 15]))
        elif kind == "length":
            size = draw(st.sampled_from([80, 159, 161, 320]))
        elif kind == "huge":
            stamp[track] = draw(st.sampled_from([2**44 // 1000, 10**14]))
        payload = draw(st.binary(min_size=size, max_size=size))
        sid = "MZ\\u002drun" if kind == "escaped" else "MZ-run"
        messages.append(plain_media(track, chunk[track], max(0, stamp[track]), payload, sid))
        chunk[track] += 1
        stamp[track] += 20 * size // 160
    return messages


@given(runs(), st.integers(1, 12))
@fuzz
def test_the_c_run_places_as_the_general_path(messages: list[str], batch: int) -> None:
    """A recording placing steady frames through the session's run in C writes what placing
    every frame through ``media`` writes, batch by batch, with the same track statistics."""
    s = stream(Path("/nonexistent"))  # the memory sink alone: nothing is written
    assert s.feed(RUN_START) is None
    recording = s.recording
    assert recording.session is not None
    reference = session_module.Session(recording.session.start, codec=recording.session.codec)
    assert (reference.batch_samples, reference.max_samples) == (
        recording.session.batch_samples,
        recording.session.max_samples,
    )
    parser = protocol.StreamProtocol()
    for message in RUN_START:
        parser.receive(message)
    written: dict[str, list[np.ndarray]] = {}
    ended = None
    for message in messages:
        event = parser.receive(message)
        if type(event) is Media:
            for b in reference.media(event):
                written.setdefault(b.track, []).append(b.samples)
    for at in range(0, len(messages), batch):
        ended = ended or recording.receive(messages[at : at + batch])
    assert ended is None
    assert recording.messages == len(RUN_START) + len(messages)
    memory = s.memory
    assert memory.tracks == list(written)
    for track, chunks in written.items():
        assert memory.audio(track).tobytes() == np.concatenate(chunks).tobytes()
    assert recording.session.track_stats == reference.track_stats


def test_the_c_run_takes_steady_frames_and_stops_where_it_must() -> None:
    """Where the run stops: before a frame it leaves, after one that completes a batch."""
    pcmu = MediaFormat("audio/x-mulaw", 8000)
    s = session_module.Session(Start("MZ1", pcmu), codec=codecs.codec_for(pcmu), batch_ms=60)
    frames = [plain_media("inbound", i + 1, 20 * i, bytes([i]) * 160) for i in range(8)]
    # The track's first frame makes its clock: the general path's.
    assert s.place_run(frames, 0) == (0, ())
    assert s.media(c_media(frames[0])) == ()
    end, batches = s.place_run(frames, 1)  # two more complete the batch of three frames
    assert end == 3 and [(b.track, b.position, len(b.samples)) for b in batches] == [
        ("inbound", 0, 480)
    ]
    assert (
        batches[0].samples.tobytes()
        == codecs.codec_for(pcmu)
        .decode(bytes([0]) * 160 + bytes([1]) * 160 + bytes([2]) * 160)
        .tobytes()
    )
    end, batches = s.place_run(frames, 3)
    assert end == 6 and [b.position for b in batches] == [480]
    gap = plain_media("inbound", 9, 160, bytes(160))  # chunks 8 and 9 missing
    assert s.place_run([frames[6], gap, frames[7]], 0) == (1, ())
    assert s.track_stats["inbound"].frames == 7
    assert s.place_run([b"binary", frames[7]], 0) == (0, ())
    assert s.place_run(frames, 8) == (8, ())
    with pytest.raises(ValueError, match="start"):
        s.place_run(frames, -1)
