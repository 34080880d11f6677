"""The sans-I/O session: frames placed on per-track timelines, gaps filled, batches cut."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from receiver.codecs import CLI_CODECS, codec_for
from receiver.events import Dtmf, Mark, Media, MediaFormat, Start, StreamSid, Track
from receiver.exceptions import LimitExceeded, MalformedMessage
from receiver.session import Session, is_gap_fill
from tests.support.timeline import Timeline

L16 = codec_for(MediaFormat("audio/x-l16", 8000))
PCMU = codec_for(CLI_CODECS["pcmu"])
START = Start(stream_sid=StreamSid("s"), media_format=L16.media_format)


def session(**kwargs: object) -> Session:
    return Session(START, codec=L16, **kwargs)  # type: ignore[arg-type]


def frame(track: Track, chunk: int | None, ts: int | None, samples: NDArray[np.int16]) -> Media:
    return Media(track=track, payload=L16.encode(samples), chunk=chunk, timestamp_ms=ts)


def ramp(start: int, n: int = 160) -> NDArray[np.int16]:
    return np.arange(start, start + n, dtype=np.int16)


def play(s: Session, frames: list[Media]) -> Timeline:
    timeline = Timeline()
    for f in frames:
        timeline.add(s.media(f))
    timeline.add(s.flush())
    return timeline


def test_contiguous_frames_are_kept_in_order() -> None:
    """Frames with exact timestamps come out as one contiguous track, no silence."""
    s = session()
    frames = [frame("inbound", i + 1, i * 20, ramp(i * 160)) for i in range(30)]
    out = play(s, frames)
    np.testing.assert_array_equal(out.audio("inbound"), np.arange(30 * 160, dtype=np.int16))
    stats = s.track_stats["inbound"]
    assert (stats.frames, stats.gaps, stats.samples) == (30, 0, 4800)


def test_lost_frames_become_exact_silence() -> None:
    """Chunks 4..6 lost: exactly 3 frames of zeros where they were, counted as one gap."""
    s = session()
    frames = [
        frame("inbound", i + 1, i * 20, ramp(1000 + i * 160))
        for i in range(10)
        if i + 1 not in (4, 5, 6)
    ]
    audio = play(s, frames).audio("inbound")
    want = np.arange(1000, 1000 + 1600, dtype=np.int16)
    want[3 * 160 : 6 * 160] = 0
    np.testing.assert_array_equal(audio, want)
    stats = s.track_stats["inbound"]
    assert (stats.gaps, stats.silence_samples, stats.chunks_missing) == (1, 480, 3)


def test_late_first_frame_starts_with_silence_on_the_shared_timeline() -> None:
    """A track whose first frame is at 100 ms starts with 800 samples of silence."""
    s = session()
    out = play(s, [frame("inbound", 1, 0, ramp(1)), frame("outbound", 1, 100, ramp(1))])
    assert len(out.audio("inbound")) == 160
    outbound = out.audio("outbound")
    assert len(outbound) == 800 + 160
    assert not outbound[:800].any()
    assert s.track_stats["outbound"].leading_silence_samples == 800
    assert s.track_stats["outbound"].gaps == 0


@pytest.mark.parametrize("jitter_ms", [-1, 1, 5, -5])
def test_timestamp_jitter_is_absorbed(jitter_ms: int) -> None:
    """Timestamps off by a few ms (under half a frame) neither insert nor drop audio."""
    s = session()
    frames = [
        frame("inbound", i + 1, max(0, i * 20 + (jitter_ms if i % 2 else 0)), ramp(i * 160))
        for i in range(10)
    ]
    np.testing.assert_array_equal(play(s, frames).audio("inbound"), np.arange(1600, dtype=np.int16))
    assert s.track_stats["inbound"].gaps == 0


def test_duplicate_frames_are_dropped() -> None:
    """A repeated chunk adds nothing and is counted."""
    s = session()
    frames = [
        frame("inbound", 1, 0, ramp(0)),
        frame("inbound", 2, 20, ramp(160)),
        frame("inbound", 2, 20, ramp(160)),
        frame("inbound", 1, 0, ramp(0)),
        frame("inbound", 3, 40, ramp(320)),
    ]
    np.testing.assert_array_equal(play(s, frames).audio("inbound"), np.arange(480))
    assert s.track_stats["inbound"].duplicate_frames == 2


def test_overlapping_frame_is_trimmed_not_duplicated() -> None:
    """A frame that overlaps audio already placed keeps only its new samples."""
    s = session()
    # The second frame starts 5 ms in: 120 of its 160 samples overlap (beyond the half-frame
    # jitter tolerance), so only its last 40 are new.
    frames = [frame("inbound", None, 0, ramp(0)), frame("inbound", None, 5, ramp(40))]
    np.testing.assert_array_equal(play(s, frames).audio("inbound"), np.arange(200))
    assert s.track_stats["inbound"].overlap_samples_dropped == 120


def test_without_timestamps_chunks_place_frames() -> None:
    """With no timestamps, a chunk jump of 3 inserts 2 frames of silence."""
    s = session()
    frames = [frame("inbound", 1, None, ramp(1)), frame("inbound", 4, None, ramp(1))]
    audio = play(s, frames).audio("inbound")
    assert len(audio) == 4 * 160
    assert not audio[160:480].any()


def test_without_timestamps_or_chunks_frames_follow_each_other() -> None:
    """Bare frames are placed one after the other."""
    s = session()
    frames = [frame("inbound", None, None, ramp(i * 160)) for i in range(5)]
    np.testing.assert_array_equal(play(s, frames).audio("inbound"), np.arange(800))


def test_batches_are_cut_by_time_and_contiguous() -> None:
    """With batch_ms=200 at 8 kHz, 100 frames of 20 ms make 10 batches."""
    s = session(batch_ms=200)
    out = play(s, [frame("inbound", i + 1, i * 20, ramp(0)) for i in range(100)])
    assert out.batches == 10


def test_long_gap_is_handed_out_in_bounded_views() -> None:
    """A 1-minute gap is filled with silence batches of at most 10 s each, views of one block."""
    s = session()
    batches = [
        *s.media(frame("inbound", 1, 0, ramp(0))),
        *s.media(frame("inbound", 2, 60_000, ramp(0))),
    ]
    silence = [b for b in batches if not b.samples.any()]
    assert sum(len(b.samples) for b in silence) == 60 * 8000 - 160
    assert max(len(b.samples) for b in silence) <= 10 * 8000
    assert len(silence) == 6
    assert all(not b.samples.flags.writeable for b in silence)
    assert all(is_gap_fill(b.samples) for b in silence)
    assert not any(is_gap_fill(b.samples) for b in batches if b.samples.any())


def test_frame_beyond_max_duration_is_refused() -> None:
    """A timestamp past the max stream duration raises LimitExceeded, not a huge fill."""
    s = session(max_duration_s=10)
    with pytest.raises(LimitExceeded):
        s.media(frame("inbound", 1, 10_000, ramp(0)))


def test_odd_l16_payload_is_malformed() -> None:
    """L16 payloads must hold whole 16-bit samples."""
    with pytest.raises(MalformedMessage, match="161 bytes"):
        session().media(Media(track="inbound", payload=b"\x00" * 161))


def test_dtmf_is_placed_at_the_audio_position() -> None:
    """A DTMF digit is stamped with how far the longest track's audio reached."""
    s = session()
    for i in range(5):
        s.media(frame("inbound", i + 1, i * 20, ramp(0)))
    record = s.on_dtmf(Dtmf(digit="7", duration_ms=100))
    assert (record.digit, record.at_ms, record.duration_ms) == ("7", 100.0, 100)


def test_pcmu_session_decodes_batches() -> None:
    """A μ-law session decodes what it batches with the codec."""
    s = Session(START, codec=PCMU)
    samples = np.arange(-8000, 8000, 50, dtype=np.int16)
    payload = PCMU.encode(samples)
    out = play(s, [Media(track="inbound", payload=payload, chunk=1, timestamp_ms=0)])
    np.testing.assert_array_equal(out.audio("inbound"), PCMU.decode(payload))


def test_far_future_timestamp_fills_at_most_max_gap_and_keeps_recording() -> None:
    """A timestamp 3 h ahead inserts only max_gap_s of silence; frames after it still land."""
    s = session(max_gap_s=2)
    frames = [
        frame("inbound", 1, 0, ramp(0)),
        frame("inbound", 2, 3 * 3600 * 1000, ramp(160)),  # a corrupt timestamp
        frame("inbound", 3, 40, ramp(320)),  # the clock as it was
        frame("inbound", 4, 60, ramp(480)),
    ]
    audio = play(s, frames).audio("inbound")
    assert len(audio) == 160 + 2 * 8000 + 3 * 160
    np.testing.assert_array_equal(audio[:160], ramp(0))
    assert not audio[160 : 160 + 16000].any()
    np.testing.assert_array_equal(audio[16160:], np.arange(160, 640, dtype=np.int16))
    stats = s.track_stats["inbound"]
    assert stats.clock_jumps == 2
    assert stats.silence_samples == 16000


def test_first_frame_far_in_the_future_is_capped_too() -> None:
    """A first frame stamped an hour in starts after at most max_gap_s of silence."""
    s = session(max_gap_s=1)
    audio = play(s, [frame("inbound", 1, 3600 * 1000, ramp(0))]).audio("inbound")
    assert len(audio) == 8000 + 160
    assert s.track_stats["inbound"].clock_jumps == 1


def test_chunk_jump_without_timestamp_fills_at_most_max_gap() -> None:
    """Chunk 1 -> 1,000,000 with no timestamp makes max_gap_s of silence, not 5.5 hours;
    the chunks after it still follow on."""
    s = session(max_gap_s=2)
    frames = [
        frame("inbound", 1, None, ramp(0)),
        frame("inbound", 1_000_000, None, ramp(160)),
        frame("inbound", 1_000_001, None, ramp(320)),
    ]
    audio = play(s, frames).audio("inbound")
    assert len(audio) == 160 + 2 * 8000 + 2 * 160
    assert not audio[160 : 160 + 16000].any()
    np.testing.assert_array_equal(audio[16160:], np.arange(160, 480, dtype=np.int16))
    stats = s.track_stats["inbound"]
    assert (stats.clock_jumps, stats.silence_samples, stats.chunks_missing) == (1, 16000, 999_998)
    assert stats.clock_jump_skipped_ms == (999_998 * 160 - 16000) / 8


@pytest.mark.parametrize("by", ["timestamp", "chunk"])
def test_total_silence_of_a_track_is_capped(by: str) -> None:
    """Jumps of max_gap_s, repeated, make at most max_silence_s of silence in all; past it
    they shift the clock (counted) and the audio still follows on."""
    s = session(max_gap_s=1, max_silence_s=3)
    frames = []
    for i in range(10):  # each frame 1 s (minus its own length) after the one before
        ts = i * 1000 if by == "timestamp" else None
        chunk = 1 + i * 50 if by == "chunk" else None
        frames.append(frame("inbound", chunk, ts, ramp(i * 160)))
    audio = play(s, frames).audio("inbound")
    stats = s.track_stats["inbound"]
    assert stats.silence_samples == 3 * 8000  # 3 whole gaps of 7,840 samples, then 480
    assert (stats.gaps, stats.silence_capped) == (4, 6)
    assert len(audio) == 10 * 160 + 3 * 8000
    np.testing.assert_array_equal(audio[audio != 0], np.arange(1, 1600, dtype=np.int16))


def test_leading_silence_counts_against_the_total() -> None:
    """A late first frame uses up the silence allowance like a gap does."""
    s = session(max_gap_s=10, max_silence_s=2)
    out = play(s, [frame("inbound", 1, 5000, ramp(0)), frame("inbound", 2, 8000, ramp(160))])
    stats = s.track_stats["inbound"]
    assert stats.leading_silence_samples == 16000
    assert (stats.silence_samples, stats.silence_capped) == (0, 2)
    assert len(out.audio("inbound")) == 16000 + 320


def test_a_reordered_frame_counts_once_as_late() -> None:
    """Chunk 3 after chunk 4: one late frame, nothing missing, no duplicate; its place is
    silence (already written), chunk 4 stays where it belongs."""
    s = session()
    frames = [
        frame("inbound", 1, 0, ramp(0)),
        frame("inbound", 2, 20, ramp(160)),
        frame("inbound", 4, 60, ramp(480)),
        frame("inbound", 3, 40, ramp(320)),
        frame("inbound", 5, 80, ramp(640)),
        frame("inbound", 5, 80, ramp(640)),
    ]
    audio = play(s, frames).audio("inbound")
    assert not audio[320:480].any()
    np.testing.assert_array_equal(audio[480:], np.arange(480, 800, dtype=np.int16))
    stats = s.track_stats["inbound"]
    assert (stats.late_frames, stats.chunks_missing, stats.duplicate_frames) == (1, 0, 1)
    assert (stats.gaps, stats.silence_samples) == (1, 160)


def test_marks_and_dtmf_past_their_caps_are_counted_and_dropped() -> None:
    """max_marks / max_dtmf records are kept; the rest are counted in ``dropped``; a mark name
    over max_name_chars is cut and counted."""
    s = session(max_marks=3, max_dtmf=2, max_name_chars=8)
    marks = [s.on_mark(Mark(name=f"m{i}" * (2 * i + 1))) for i in range(5)]
    digits = [s.on_dtmf(Dtmf(digit="1")) for _ in range(4)]
    assert [m.name if m else None for m in marks] == ["m0", "m1m1m1", "m2m2m2m2", None, None]
    assert [d is not None for d in digits] == [True, True, False, False]
    assert (len(s.marks), len(s.dtmf)) == (3, 2)
    assert s.dropped.as_dict() == {"marks": 2, "dtmf": 2, "mark_names_cut": 1}
