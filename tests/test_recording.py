"""A stream's life without the network: ``StreamRecording`` fed messages, read back through
the memory sink, and ``end_for_close`` for every way a connection can close (the shell's
tests, test_e2e.py and test_shell_limits.py, show the same over real TLS)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from websockets.frames import Close

from receiver.codecs import CLI_CODECS, codec_for
from receiver.events import Track
from receiver.metrics import Count, Counters, ReceiverMetrics
from receiver.recording import StreamRecording, end_for_close
from receiver.session import DtmfRecord, MarkRecord
from receiver.simulate import build_messages
from receiver.sinks import MemorySink, SinkFactory, StreamSummary
from receiver.sinks.base import StreamEnd
from tests.support.receiver import make_settings
from tests.support.wire import media_event, start_event

L16 = codec_for(CLI_CODECS["l16-8k"])
PCMU = codec_for(CLI_CODECS["pcmu"])
STOP = json.dumps({"event": "stop"})
STOP_END = StreamEnd("stop", 1000, None)


def le16(samples: NDArray[np.int16]) -> bytes:
    """Little-endian 16-bit PCM, the default RECEIVER_L16_BYTE_ORDER, made without our codec."""
    return samples.astype("<i2").tobytes()


def dtmf(digit: str) -> str:
    return json.dumps({"event": "dtmf", "dtmf": {"digit": digit, "duration": 120}})


def mark(name: str) -> str:
    return json.dumps({"event": "mark", "mark": {"name": name}})


def unknown(name: str) -> str:
    return json.dumps({"event": name})


class FailingSink(MemorySink):
    """A memory sink whose ``fail_on`` step raises, the way a full disk fails a write."""

    def __init__(self, fail_on: str, *, after_samples: int = 0) -> None:
        super().__init__()
        self.fail_on = fail_on
        self.after_samples = after_samples
        self.written = 0

    def open(self, info: Any) -> None:
        if self.fail_on == "open":
            raise OSError(28, "No space left on device")
        super().open(info)

    def write(self, track: Track, position: int, samples: NDArray[np.int16]) -> None:
        if self.fail_on == "write" and self.written + len(samples) > self.after_samples:
            raise OSError(28, "No space left on device")
        self.written += len(samples)
        super().write(track, position, samples)


@dataclass
class Stream:
    """A recording with the test's counters, metrics and every sink its factories made."""

    recording: StreamRecording
    counters: Counters
    metrics: ReceiverMetrics
    sinks: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def memory(self) -> MemorySink:
        """The one memory sink (the stream started)."""
        [sink] = self.sinks["memory"]
        assert isinstance(sink, MemorySink)
        return sink

    def feed(self, messages: Sequence[str | bytes], *, batch: int = 0) -> StreamEnd | None:
        """``receive`` in batches of ``batch`` messages (0: all at once); the first end."""
        size = batch or max(len(messages), 1)
        for at in range(0, len(messages), size):
            end = self.recording.receive(messages[at : at + size])
            if end is not None:
                return end
        return None

    async def summary(self, end: StreamEnd) -> tuple[StreamEnd, StreamSummary]:
        """``finish`` the stream; how it ended and the summary the memory sink got."""
        ended = await self.recording.finish(end)
        assert self.memory.summary is not None
        return ended, self.memory.summary


def stream(
    tmp_path: Path,
    *,
    sinks: Sequence[tuple[str, SinkFactory]] = (),
    memory: bool = True,
    **settings: Any,
) -> Stream:
    """A ``StreamRecording`` with ``sinks`` then a memory sink (unless ``memory`` is False),
    made the way the server makes it; the sinks made are kept by name."""
    counters = Counters()
    metrics = ReceiverMetrics(counters=counters, active_streams=int, live_streams=tuple)
    made: dict[str, list[Any]] = {}

    def keep(name: str, factory: SinkFactory) -> SinkFactory:
        def make(s: Any) -> Any:
            sink = factory(s)
            made.setdefault(name, []).append(sink)
            return sink

        return make

    factories = [*sinks, *([("memory", lambda s: MemorySink())] if memory else [])]
    recording = StreamRecording(
        make_settings(tmp_path, **settings),
        [(name, keep(name, factory)) for name, factory in factories],
        counters=counters,
        metrics=metrics,
        path="/media",
        query="room=7",
        remote="192.0.2.1",
    )
    return Stream(recording, counters, metrics, made)


def tone(n: int, seed: int) -> NDArray[np.int16]:
    """Audio with every 16-bit value possible, different per seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(-32768, 32767, n, dtype=np.int16, endpoint=True)


def full_stream() -> tuple[list[str], dict[Track, NDArray[np.int16]]]:
    """connected, start, both tracks (1 s in, 0.5 s out), a digit and a mark at 200 ms, stop."""
    audio: dict[Track, NDArray[np.int16]] = {"inbound": tone(8000, 1), "outbound": tone(4000, 2)}
    messages = build_messages(
        codec=L16,
        tracks={track: le16(samples) for track, samples in audio.items()},
        stream_sid="MZ-full",
    )
    # After connected, start and 10 frames of each track: 200 ms into the stream.
    return [*messages[:22], dtmf("7"), mark("greeting"), *messages[22:]], audio


@pytest.mark.parametrize("batch", [1, 7, 0])
async def test_a_whole_stream_reaches_the_sink_exactly(tmp_path: Path, batch: int) -> None:
    """Both tracks sample-exact, the digit and the mark at their place, stop's 1000, the
    summary's figures and the counters, however the messages are batched."""
    s = stream(tmp_path)
    messages, audio = full_stream()
    assert s.feed(messages, batch=batch) == STOP_END
    assert s.recording.messages == len(messages)
    sink = s.memory
    assert sink.info is not None
    assert (sink.info.path, sink.info.query, sink.info.remote) == ("/media", "room=7", "192.0.2.1")
    assert (
        sink.info.start.stream_sid == "MZ-full"
        and sink.info.codec is not None
        and sink.info.codec.name == "l16"
    )
    assert sink.events == [
        DtmfRecord(digit="7", at_ms=200.0, duration_ms=120, track=None),
        MarkRecord(name="greeting", at_ms=200.0),
    ]
    assert sink.summary is None  # nothing is closed before finish
    ended, summary = await s.summary(STOP_END)
    assert ended == STOP_END
    assert sink.tracks == ["inbound", "outbound"]
    for track, samples in audio.items():
        np.testing.assert_array_equal(sink.audio(track), samples)
    assert summary.end == STOP_END and summary.sample_rate_hz == 8000
    assert summary.messages == len(messages)
    assert {t: (x.frames, x.samples, x.gaps) for t, x in summary.tracks.items()} == {
        "inbound": (50, 8000, 0),
        "outbound": (25, 4000, 0),
    }
    assert summary.dtmf == tuple(sink.events[:1]) and summary.marks == tuple(sink.events[1:])
    assert summary.unknown_events == () and summary.sink_errors == ()
    assert summary.dropped == {"marks": 0, "dtmf": 0, "mark_names_cut": 0, "unknown_event_names": 0}
    assert s.counters["streams"] == 1 and s.counters["streams_ended", "stop"] == 1
    assert s.metrics.finished[("l16", "inbound", "frames")] == 50
    assert s.metrics.finished[("l16", "outbound", "audio_samples")] == 4000


async def test_the_last_line_carries_the_figures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream's lines carry its sid; the last one its end, close code, messages, tracks."""
    s = stream(tmp_path)
    messages, _ = full_stream()
    with caplog.at_level(logging.INFO, logger="receiver"):
        s.feed(messages)
        await s.recording.finish(STOP_END)
    lines = [(r.getMessage(), getattr(r, "stream_sid", None)) for r in caplog.records]
    assert lines[0] == ("stream started: audio/x-L16 8000 Hz, tracks inbound,outbound", "MZ-full")
    assert lines[1] == ("stop received", "MZ-full")
    last = caplog.records[-1]
    assert last.getMessage().startswith(
        "stream ended (stop) after "
    ) and last.getMessage().endswith(": inbound 1.00 s (0 gaps), outbound 0.50 s (0 gaps)")
    fields = last.fields  # type: ignore[attr-defined]
    assert {k: fields[k] for k in ("end", "close_code", "messages", "files")} == {
        "end": "stop",
        "close_code": 1000,
        "messages": len(messages),
        "files": [],
    }
    assert fields["tracks"] == {
        "inbound": {"duration_s": 1.0, "gaps": 0},
        "outbound": {"duration_s": 0.5, "gaps": 0},
    }


async def test_what_follows_the_end_in_its_batch_is_not_read(tmp_path: Path) -> None:
    """A batch of stop then garbage ends with stop: the garbage is neither counted nor parsed."""
    s = stream(tmp_path)
    messages = build_messages(codec=PCMU, tracks={"inbound": b"\xff" * 800}, stream_sid="after")
    assert s.feed([*messages, "not json", b"\x00"]) == STOP_END
    assert s.recording.messages == len(messages)
    assert s.counters["protocol_errors"] == 0


@pytest.mark.parametrize(
    ("message", "kind", "code"),
    [
        ("{not json", "malformed", 1007),
        (b"\x00\x01", "unsupported", 1003),
        (media_event(2, "inbound", 0, b"\x00\x00"), "unexpected", 1008),
        (dtmf("1"), "unexpected", 1008),
    ],
    ids=["bad-json", "binary", "media-before-start", "dtmf-before-start"],
)
async def test_a_protocol_error_before_start_opens_no_sink(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, message: str | bytes, kind: str, code: int
) -> None:
    """Refused before start: a protocol-error with the error's close code, counted, one line;
    no sink was made, so finish has nothing to close and counts no stream."""
    s = stream(tmp_path)
    with caplog.at_level(logging.INFO, logger="receiver"):
        end = s.feed([json.dumps({"event": "connected"}), message])
    assert end is not None
    assert (end.kind, end.close_code) == ("protocol-error", code)
    assert s.counters["protocol_errors", kind] == 1
    assert [r.getMessage() for r in caplog.records] == [f"closing with {code}: {end.reason}"]
    assert await s.recording.finish(end) == end
    assert s.sinks == {} and s.counters["streams_ended"] == 0


async def test_a_bad_message_mid_stream_keeps_the_audio_before(tmp_path: Path) -> None:
    """Bad JSON after 0.5 s of audio: closed with 1007, the audio and the end in the record."""
    s = stream(tmp_path)
    audio = tone(4000, 3)
    messages = build_messages(codec=L16, tracks={"inbound": le16(audio)}, stream_sid="bad")
    end = s.feed([*messages[:-1], '{"event": "media", "media": ', *messages[-1:]], batch=5)
    assert end is not None
    assert (end.kind, end.close_code) == ("protocol-error", 1007)
    assert end.reason is not None and "JSON" in end.reason
    ended, summary = await s.summary(end)
    assert ended == end and summary.end == end
    np.testing.assert_array_equal(s.memory.audio("inbound"), audio)
    assert s.counters["protocol_errors", "malformed"] == 1
    assert s.counters["streams_ended", "protocol-error"] == 1


async def test_a_payload_of_no_whole_samples_is_malformed(tmp_path: Path) -> None:
    """The session's refusals end the stream like the parser's: 3 bytes of L16, 1007."""
    s = stream(tmp_path)
    start = json.dumps(start_event("odd", 8000, ["inbound"]))
    end = s.feed([start, media_event(2, "inbound", 0, b"\x00\x01\x02")])
    assert end is not None
    assert (end.kind, end.close_code) == ("protocol-error", 1007)
    assert "not whole samples" in (end.reason or "")


async def test_an_unsupported_codec_still_gets_its_record(tmp_path: Path) -> None:
    """A start in an encoding we cannot decode opens the sinks (codec None, the reason), then
    ends with 1003; the summary says so, with no audio."""
    s = stream(tmp_path)
    start = json.dumps(start_event("opus", 48000, ["inbound"])).replace("audio/x-L16", "audio/opus")
    end = s.feed([start, media_event(2, "inbound", 0, b"\x00\x00")])
    assert end is not None
    assert (end.kind, end.close_code) == ("protocol-error", 1003)
    assert s.recording.messages == 1 and s.recording.session is None
    info = s.memory.info
    assert info is not None and info.codec is None
    assert info.unsupported_reason is not None and "audio/opus" in info.unsupported_reason
    ended, summary = await s.summary(end)
    assert ended == end and summary.end == end
    assert summary.sample_rate_hz == 48000 and summary.tracks == {}
    assert s.counters["protocol_errors", "unsupported"] == 1
    assert s.counters["streams"] == 1 and s.counters["streams_ended", "protocol-error"] == 1


async def test_too_many_custom_parameters_are_a_limit(tmp_path: Path) -> None:
    """Past RECEIVER_MAX_CUSTOM_PARAMETERS the start is refused with 1008, before any sink."""
    s = stream(tmp_path, max_custom_parameters=2)
    messages = build_messages(
        codec=PCMU,
        tracks={"inbound": b""},
        custom_parameters={"a": "1", "b": "2", "c": "3"},
    )
    end = s.feed(messages)
    assert end is not None
    assert (end.kind, end.close_code) == ("protocol-error", 1008)
    assert s.counters["protocol_errors", "limit"] == 1 and s.sinks == {}


async def test_the_only_sink_failing_ends_the_stream_with_1011(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With every recording sink gone, the stream ends with 1011 at the next batch: counted,
    logged, the failed sink named in the summary it still gets."""
    s = stream(
        tmp_path, sinks=[("wav", lambda _: FailingSink("write", after_samples=3200))], memory=False
    )
    messages = build_messages(codec=L16, tracks={"inbound": le16(tone(8000, 4))}, stream_sid="f")
    with caplog.at_level(logging.INFO, logger="receiver"):
        end = s.feed(messages)
    assert end is not None
    assert (end.kind, end.close_code) == ("error", 1011)
    assert end.reason is not None and end.reason.startswith("recording failed: write: sink 'wav'")
    assert len(end.reason.encode()) <= 123
    assert s.recording.messages == 2 + 30  # the batch that failed is the third of 200 ms
    assert s.counters["recording_failures"] == 1 and s.counters["sink_errors", "wav"] == 1
    assert f"closing with 1011: {end.reason}" in [r.getMessage() for r in caplog.records]
    assert await s.recording.finish(end) == end
    [sink] = s.sinks["wav"]
    assert sink.summary is not None and sink.summary.end == end
    assert len(sink.audio("inbound")) == 3200
    assert len(sink.summary.sink_errors) == 1 and "No space left" in sink.summary.sink_errors[0]


async def test_a_failing_sink_beside_another_is_dropped_not_the_stream(tmp_path: Path) -> None:
    """One of two sinks failing at open: counted and named; the stream records to the other."""
    s = stream(tmp_path, sinks=[("broken", lambda _: FailingSink("open"))])
    messages = build_messages(codec=L16, tracks={"inbound": le16(tone(1600, 5))})
    assert s.feed(messages) == STOP_END
    ended, summary = await s.summary(STOP_END)
    assert ended == STOP_END
    assert len(s.memory.audio("inbound")) == 1600
    assert [e.split(":")[0] for e in summary.sink_errors] == ["open"]
    assert s.counters["sink_errors", "broken"] == 1 and s.counters["recording_failures"] == 0


async def test_a_sink_failing_at_open_alone_ends_the_stream_at_start(tmp_path: Path) -> None:
    """No sink left after open: 1011 at the start message, nothing else read."""
    s = stream(tmp_path, sinks=[("wav", lambda _: FailingSink("open"))], memory=False)
    messages = build_messages(codec=PCMU, tracks={"inbound": b"\xff" * 1600})
    end = s.feed(messages)
    assert end is not None and (end.kind, end.close_code) == ("error", 1011)
    assert s.recording.messages == 2 and s.recording.session is None
    # A batch that arrives after the end is not read: the same end, no internal error.
    assert s.recording.receive(messages[2:]) == end
    assert s.recording.messages == 2 and s.counters["internal_errors"] == 0
    assert (await s.recording.finish(end)).kind == "error"
    assert s.counters["streams_ended", "error"] == 1


async def test_a_stop_with_no_sink_left_after_the_flush_is_a_failed_recording(
    tmp_path: Path,
) -> None:
    """The last batch, written at finish, fails the only sink: stop becomes error 1011."""
    s = stream(tmp_path, sinks=[("wav", lambda _: FailingSink("write"))], memory=False)
    # 100 ms of audio: under one 200 ms batch, so nothing is written before the flush.
    messages = build_messages(codec=PCMU, tracks={"inbound": b"\xff" * 800})
    assert s.feed(messages) == STOP_END
    ended = await s.recording.finish(STOP_END)
    assert (ended.kind, ended.close_code) == ("error", 1011)
    [sink] = s.sinks["wav"]
    assert sink.summary is not None and sink.summary.end == ended
    assert s.counters["recording_failures"] == 1
    assert s.counters["streams_ended", "error"] == 1 and s.counters["streams_ended", "stop"] == 0


async def test_a_bug_ends_the_stream_with_1011_and_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception of no known kind (here a sink factory's) ends the stream with 1011
    "internal error", counted, logged with its traceback, and nothing after it is read."""

    def bug(settings: Any) -> MemorySink:
        raise RuntimeError("a bug")

    s = stream(tmp_path, sinks=[("bug", bug)])
    messages = build_messages(codec=PCMU, tracks={"inbound": b"\xff" * 800})
    with caplog.at_level(logging.INFO, logger="receiver"):
        end = s.feed(messages)
    assert end == StreamEnd("error", 1011, "internal error")
    assert s.recording.messages == 2
    assert s.counters["internal_errors"] == 1
    [record] = [r for r in caplog.records if r.getMessage() == "internal error"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_unknown_event_names_are_capped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unknown events are counted and skipped; past RECEIVER_MAX_UNKNOWN_EVENTS names only
    counted, with one line; names are cut to RECEIVER_MAX_NAME_CHARS."""
    s = stream(tmp_path, max_unknown_events=2, max_name_chars=16)
    messages = build_messages(codec=PCMU, tracks={"inbound": b"\xff" * 1600}, stream_sid="u")
    odd = [unknown(f"odd{i % 4}" + "y" * 40) for i in range(8)]
    with caplog.at_level(logging.INFO, logger="receiver"):
        assert s.feed([*messages[:3], *odd, *messages[3:]], batch=3) == STOP_END
    _, summary = await s.summary(STOP_END)
    assert summary.unknown_events == ("odd0" + "y" * 12, "odd1" + "y" * 12)
    assert summary.dropped["unknown_event_names"] == 4
    assert s.counters["unknown_events"] == 8
    assert s.counters["dropped", "unknown_event_names"] == 4
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("skipping unknown event 'odd0yyyyyyyyyyyy'") == 1
    assert [line for line in lines if "counted in stream.json" in line] == [
        "unknown_event_names past 2 a stream: counted in stream.json, dropped"
    ]


async def test_digits_and_marks_past_their_bounds_are_counted_as_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past RECEIVER_MAX_DTMF and _MAX_MARKS nothing more reaches the sinks: counted in the
    summary and the counters, one line each; a long mark name is cut, counted, and kept."""
    s = stream(tmp_path, max_dtmf=3, max_marks=5, max_name_chars=10)
    messages = build_messages(codec=PCMU, tracks={"inbound": b"\xff" * 1600}, stream_sid="b")
    extra = [
        *(dtmf(str(i)) for i in range(7)),
        mark("n" * 60),
        *(mark(f"m{i}") for i in range(8)),
    ]
    with caplog.at_level(logging.INFO, logger="receiver"):
        assert s.feed([*messages[:-1], *extra, messages[-1]]) == STOP_END
    _, summary = await s.summary(STOP_END)
    assert [d.digit for d in summary.dtmf] == ["0", "1", "2"]
    assert [m.name for m in summary.marks] == ["n" * 10, "m0", "m1", "m2", "m3"]
    assert len(s.memory.events) == 3 + 5
    assert summary.dropped == {"marks": 4, "dtmf": 4, "mark_names_cut": 1, "unknown_event_names": 0}
    assert s.counters["dropped", "dtmf"] == 4 and s.counters["dropped", "marks"] == 4
    assert s.counters["dropped", "mark_names_cut"] == 1
    warnings = [
        r.getMessage() for r in caplog.records if "counted in stream.json" in r.getMessage()
    ]
    assert sorted(warnings) == [
        "dtmf past 3 a stream: counted in stream.json, dropped",
        "mark_names_cut too long a stream: counted in stream.json, dropped",
        "marks past 5 a stream: counted in stream.json, dropped",
    ]


async def test_a_clock_jump_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two chunk jumps past RECEIVER_MAX_GAP_S: silence kept to the limit each time, one line."""
    s = stream(tmp_path, max_gap_s=1)
    start = json.dumps(start_event("jump", 8000, ["inbound"]))
    pcm = le16(np.full(160, 1000, dtype=np.int16))
    frames = [
        media_event(2 + i, "inbound", 0, pcm, timestamp=False, chunk=chunk)
        for i, chunk in enumerate([1, 1000, 1001, 50_000, 50_001])
    ]
    with caplog.at_level(logging.INFO, logger="receiver"):
        assert s.feed([start, *frames, STOP], batch=1) == STOP_END
    _, summary = await s.summary(STOP_END)
    assert summary.tracks["inbound"].clock_jumps == 2
    assert len(s.memory.audio("inbound")) == 5 * 160 + 2 * 8000
    jumped = [r for r in caplog.records if "jumped past RECEIVER_MAX_GAP_S" in r.getMessage()]
    assert len(jumped) == 1


async def test_a_frame_past_the_maximum_duration_is_a_limit(tmp_path: Path) -> None:
    """A timestamp beyond RECEIVER_MAX_STREAM_DURATION_S ends the stream with 1008."""
    s = stream(tmp_path, max_stream_duration_s=1, max_gap_s=10)
    start = json.dumps(start_event("long", 8000, ["inbound"]))
    pcm = le16(np.zeros(160, dtype=np.int16))
    end = s.feed([start, media_event(2, "inbound", 0, pcm), media_event(3, "inbound", 100, pcm)])
    assert end is not None and (end.kind, end.close_code) == ("protocol-error", 1008)
    assert s.counters["protocol_errors", "limit"] == 1


# end_for_close: every way a connection closes without stop.


@dataclass(frozen=True)
class CloseCase:
    """What the shell knows of a close, and what it must mean for the stream."""

    rcvd: Close | None
    sent: Close | None
    rcvd_then_sent: bool | None
    end: StreamEnd
    line: str | None  # the one log line, if any
    keepalive_expired: bool = False
    write_overflow: bool = False
    draining: bool = False


LOST = "connection lost without a close frame"
CLOSES = {
    "keepalive": CloseCase(
        None,
        Close(1011, "keepalive ping timeout"),
        None,
        StreamEnd("keepalive-timeout", 1011, "no pong within 7.5 s"),
        "closing with 1011: no pong within 7.5 s",
        keepalive_expired=True,
    ),
    "keepalive-first": CloseCase(
        Close(1000, ""),
        Close(1009, "too big"),
        False,
        StreamEnd("keepalive-timeout", 1011, "no pong within 7.5 s"),
        "closing with 1011: no pong within 7.5 s",
        keepalive_expired=True,
        write_overflow=True,
        draining=True,
    ),
    "write-overflow": CloseCase(
        None,
        None,
        None,
        StreamEnd("client-close", 1006, "aborted: the client did not read what we sent"),
        None,  # the gate logs the overflow
        write_overflow=True,
    ),
    "shutdown": CloseCase(
        Close(1001, ""),
        Close(1001, "server shutting down"),
        False,
        StreamEnd("shutdown", 1001, "server shutting down"),
        None,
        draining=True,
    ),
    "1001-without-a-drain": CloseCase(
        Close(1001, "going"),
        Close(1001, "going"),
        True,
        StreamEnd("client-close", 1001, "going"),
        "client closed (1001) without stop",
    ),
    "refused-1002": CloseCase(
        None,
        Close(1002, "invalid opcode 3"),
        None,
        StreamEnd("protocol-error", 1002, "invalid opcode 3"),
        "closed with 1002: invalid opcode 3",
    ),
    "refused-1007": CloseCase(
        Close(1007, ""),
        Close(1007, "invalid start byte at position 0"),
        False,
        StreamEnd("protocol-error", 1007, "invalid start byte at position 0"),
        "closed with 1007: invalid start byte at position 0",
    ),
    "refused-1009": CloseCase(
        None,
        Close(1009, "over size limit (70000 > 65536 bytes)"),
        None,
        StreamEnd("protocol-error", 1009, "over size limit (70000 > 65536 bytes)"),
        "closed with 1009: over size limit (70000 > 65536 bytes)",
    ),
    "client-1007-echoed": CloseCase(
        Close(1007, "yours"),
        Close(1007, "yours"),
        True,
        StreamEnd("client-close", 1007, "yours"),
        "client closed (1007) without stop",
    ),
    "client-1000": CloseCase(
        Close(1000, "bye"),
        Close(1000, "bye"),
        True,
        StreamEnd("client-close", 1000, "bye"),
        "client closed (1000) without stop",
    ),
    "client-gone-1006": CloseCase(
        None, None, None, StreamEnd("client-close", 1006, LOST), "client closed (1006) without stop"
    ),
}


@pytest.mark.parametrize("name", CLOSES)
def test_end_for_close(name: str, caplog: pytest.LogCaptureFixture) -> None:
    """Each close maps to its end kind, code and line; refused frames count as protocol
    errors, and nothing else does."""
    case = CLOSES[name]
    counters = Counters()
    with caplog.at_level(logging.INFO, logger="receiver"):
        end = end_for_close(
            case.rcvd,
            case.sent,
            case.rcvd_then_sent,
            keepalive_expired=case.keepalive_expired,
            write_overflow=case.write_overflow,
            draining=case.draining,
            ping_timeout_s=7.5,
            counters=counters,
            log=logging.getLogger("receiver.test"),
        )
    assert end == case.end
    refused = {"frame": 1} if end.kind == "protocol-error" else {}
    assert counters.labels(Count.PROTOCOL_ERRORS) == refused
    assert [r.getMessage() for r in caplog.records] == ([case.line] if case.line else [])


def test_the_recording_maps_a_close_with_its_settings(tmp_path: Path) -> None:
    """``closed`` is ``end_for_close`` with the stream's ping timeout, counters and logger."""
    s = stream(tmp_path, ping_timeout_s=3)
    end = s.recording.closed(
        None, None, None, keepalive_expired=True, write_overflow=False, draining=False
    )
    assert end == StreamEnd("keepalive-timeout", 1011, "no pong within 3 s")
    end = s.recording.closed(
        None,
        Close(1009, "too big"),
        False,
        keepalive_expired=False,
        write_overflow=False,
        draining=False,
    )
    assert end == StreamEnd("protocol-error", 1009, "too big")
    assert s.counters["protocol_errors", "frame"] == 1
