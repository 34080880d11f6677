"""One stream's life, sans I/O: places each frame on its track's timeline and batches audio.

Sample ``k`` of a track sits at ``k / rate`` seconds after the stream's start, for every track,
so the tracks of one stream share one timeline. A frame's place comes from ``media.timestamp``
(ms since the stream started), falling back to ``chunk`` and then to "right after the last
frame". Lost frames become silence of exactly their length; duplicated or overlapping frames
never duplicate audio. Audio is decoded in batches (one numpy call per ``batch_ms``), which is
both what keeps the decoder cheap and what the sinks want.

Everything a client can make grow is bounded: silence per jump (``max_gap_s``, whichever field
placed the frame) and per track (``max_silence_s``), marks, DTMF digits and mark names. Past a
bound the excess is counted (``TrackStats``, ``Dropped``), never stored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from receiver.codecs import Codec
from receiver.events import Dtmf, Mark, Media, Start, Track
from receiver.exceptions import LimitExceeded, MalformedMessage


class AudioBatch(NamedTuple):
    """Decoded samples of one track starting at ``position`` (samples since stream start).

    ``samples`` may be a read-only view shared with other batches (silence): sinks must not
    modify it. A NamedTuple, as ``Media`` is: one is made for every batch, and a frozen
    dataclass takes 1.6 times as long to make.
    """

    track: Track
    position: int
    samples: NDArray[np.int16]


# What most frames return: no batch is complete yet.
_NOTHING: tuple[AudioBatch, ...] = ()

# Gaps are handed out in slices of at most this long: a 60 s gap is 6 batches, so that a read
# full of frames that each make max_gap_s of silence stays short (bench figures in git log).
SILENCE_SLICE_S = 10
# The slices are views of one shared, read-only block (960 KB a process, at the highest rate a
# codec decodes), never allocated a gap; sinks tell them by ``is_gap_fill``.
_SILENCE = np.zeros(SILENCE_SLICE_S * 48_000, dtype=np.int16)
_SILENCE.flags.writeable = False


def is_gap_fill(samples: NDArray[np.int16]) -> bool:
    """Whether a batch is silence the session made for a gap (a sink may store it as a hole)."""
    return samples.base is _SILENCE


@dataclass(frozen=True, slots=True)
class DtmfRecord:
    """A key press placed on the stream's timeline (``at_ms``: where the audio stood)."""

    digit: str
    at_ms: float
    duration_ms: int | None
    track: Track | None


@dataclass(frozen=True, slots=True)
class MarkRecord:
    """A mark placed on the stream's timeline."""

    name: str
    at_ms: float


@dataclass(slots=True)
class TrackStats:
    """What happened to one track; ``samples`` is the track's length including silence."""

    frames: int = 0
    bytes: int = 0
    samples: int = 0
    audio_samples: int = 0
    leading_silence_samples: int = 0
    gaps: int = 0
    silence_samples: int = 0
    duplicate_frames: int = 0
    # Frames of a chunk that was missing when a later one came: their place is already silence.
    late_frames: int = 0
    overlap_samples_dropped: int = 0
    chunks_missing: int = 0
    # Jumps past max_gap_s (timestamp or chunk) and jumps cut short by max_silence_s: the
    # silence they would have made is skipped (the track's clock shifts), in skipped_ms.
    clock_jumps: int = 0
    silence_capped: int = 0
    clock_jump_skipped_ms: float = 0.0
    first_chunk: int | None = None
    last_chunk: int | None = None
    first_timestamp_ms: int | None = None
    last_timestamp_ms: int | None = None

    def as_dict(self, sample_rate_hz: int) -> dict[str, Any]:
        """The record form, with the durations a person reads first."""
        record = asdict(self)
        record["duration_s"] = round(self.samples / sample_rate_hz, 6)
        record["silence_s"] = round(self.silence_samples / sample_rate_hz, 6)
        return record


@dataclass(slots=True)
class Dropped:
    """What a stream sent past its bounds: counted here, not kept."""

    marks: int = 0
    dtmf: int = 0
    mark_names_cut: int = 0  # marks kept with their name cut to max_name_chars

    def as_dict(self) -> dict[str, int]:
        """The record form."""
        return asdict(self)


# How far behind the newest chunk a missing one is remembered, so that it counts as late rather
# than as a duplicate when it comes after all (2.56 s of 20 ms frames; a bounded set a track).
_LATE_CHUNKS = 128


@dataclass(slots=True)
class _TrackClock:
    silence_left: int  # what max_silence_s still allows this track
    stats: TrackStats = field(default_factory=TrackStats)
    missing: set[int] = field(default_factory=set)  # recent missing chunks
    cursor: int = 0  # next free sample position of the track
    offset: int = 0  # subtracted from timestamp positions after a clock jump
    shift: int = 0  # where the last frame was put minus where its timestamp said (jitter)
    pending: list[bytes] = field(default_factory=list)
    pending_start: int = 0
    pending_samples: int = 0
    # The steady state, for ``Session.media``'s fast path: the chunk that continues the track
    # (None: the next frame takes the general path) and the last frame's size, samples and
    # tolerance.
    next_chunk: int | None = None
    frame_bytes: int = 0
    frame_samples: int = 0
    frame_tolerance: int = 0


def _append(clock: _TrackClock, payload: bytes, n: int, cursor: int) -> None:
    """Put a frame's ``n`` samples at ``cursor``, the track's new end, in the pending batch."""
    pending = clock.pending
    if not pending:
        clock.pending_start = cursor
    pending.append(payload)
    clock.pending_samples += n
    clock.cursor = cursor + n
    clock.stats.audio_samples += n
    clock.stats.samples = cursor + n


def _steady_python(clock: _TrackClock, frame: Media, rate: int, max_samples: int) -> bool:
    """Place a frame that continues its track as the general path would; False (nothing
    changed) for any other frame, which the general path then places.

    Nearly every frame: the next chunk, as long as the last frame, stamped within its tolerance
    of the cursor and not wholly behind where the last frame went. The reference for
    ``receiver._speedups.steady``, its C twin (tests/test_speedups.py holds the two to the same
    results; tests/test_fuzz_session.py holds this path to the general one).
    """
    _, payload, chunk, timestamp, _ = frame
    if chunk is None or chunk != clock.next_chunk or timestamp is None:
        return False
    size = len(payload)
    if size != clock.frame_bytes:
        return False
    cursor = clock.cursor
    target = timestamp * rate // 1000 - clock.offset
    delta = target - cursor
    n = clock.frame_samples
    tolerance = clock.frame_tolerance
    if not (
        -tolerance <= delta <= tolerance
        and (delta >= 0 or clock.shift + delta > -n)
        and target + n <= max_samples
    ):
        return False
    stats = clock.stats
    stats.frames += 1
    stats.bytes += size
    stats.last_chunk = chunk
    stats.last_timestamp_ms = timestamp
    clock.next_chunk = chunk + 1
    clock.shift = -delta
    _append(clock, payload, n, cursor)
    return True


try:
    from receiver._speedups import place_run as _place_run
    from receiver._speedups import steady as _steady
except ImportError:  # built without a compiler: the Python twin, and no run in C
    _steady = _steady_python
    _place_run = None  # type: ignore[assignment]

PLACES_RUNS = _place_run is not None
"""Whether ``Session.place_run`` can take frames (it needs the C build)."""


class Session:
    """Place frames of one stream in time; return decoded batches ready for the sinks.

    ``media`` returns the batches that became complete (most calls return none); ``flush``
    returns what is still pending and is called once at the end, however the stream ended.
    Raises ``MalformedMessage`` for a payload of impossible length and ``LimitExceeded`` for a
    frame placed beyond ``max_duration_s``. Defaults match ``receiver.settings``.
    """

    def __init__(
        self,
        start: Start,
        *,
        codec: Codec,
        batch_ms: int = 200,
        max_duration_s: float = 21600.0,
        max_gap_s: float = 60.0,
        max_silence_s: float = 3600.0,
        max_marks: int = 10_000,
        max_dtmf: int = 10_000,
        max_name_chars: int = 256,
    ) -> None:
        self.start = start
        self.codec = codec
        self.rate = codec.sample_rate_hz
        self.batch_samples = max(1, self.rate * batch_ms // 1000)
        self.max_samples = int(max_duration_s * self.rate)
        self.max_gap_samples = int(max_gap_s * self.rate)
        self.max_silence_samples = int(max_silence_s * self.rate)
        self.max_marks = max_marks
        self.max_dtmf = max_dtmf
        self.max_name_chars = max_name_chars
        self._one_ms = max(1, self.rate // 1000)
        self._bytes_per_sample = codec.bytes_per_sample
        self._tracks: dict[Track, _TrackClock] = {}
        # The slice of silence that long gaps are handed out in views of.
        slice_samples = SILENCE_SLICE_S * self.rate
        self._silence = _SILENCE[:slice_samples]
        if len(self._silence) < slice_samples:  # no codec decodes past 48 kHz; but never less
            self._silence = np.zeros(slice_samples, dtype=np.int16)
            self._silence.flags.writeable = False
        self.dtmf: list[DtmfRecord] = []
        self.marks: list[MarkRecord] = []
        self.dropped = Dropped()
        # Jumps of every track's clock so far (their clock_jumps and silence_capped).
        self.clock_shifts = 0

    def place_run(
        self, messages: Sequence[str | bytes], start: int
    ) -> tuple[int, Sequence[AudioBatch]]:
        """``media`` for a run of steady frames, parsed and placed in C: from ``messages[start]``
        while each is the platform's plain media message (the one ``receiver._speedups.media``
        parses) that continues its track on the steady path, with no Media and no Python call
        a frame. Returns where it stopped (before a message it did not take, or after a frame
        that completed a batch) and that batch. Call it only while the protocol is streaming:
        then its ``receive`` makes of each message taken here the very frame placed here.
        Takes none without the C build (``PLACES_RUNS``)."""
        if _place_run is None:
            return start, _NOTHING
        end, due = _place_run(
            messages, start, self._tracks, self.rate, self.max_samples, self.batch_samples
        )
        if due is None:
            return end, _NOTHING
        return end, list(self._flush_track(due, self._tracks[due]))

    def media(self, frame: Media) -> Sequence[AudioBatch]:
        """Place one frame; return the batches it completed (usually none)."""
        track = frame.track
        clock = self._tracks.get(track)
        if clock is not None and _steady(clock, frame, self.rate, self.max_samples):
            if clock.pending_samples >= self.batch_samples:
                return list(self._flush_track(track, clock))
            return _NOTHING
        _, payload, chunk, timestamp, _ = frame
        size = len(payload)
        bytes_per_sample = self._bytes_per_sample
        if size % bytes_per_sample:
            raise MalformedMessage(
                f"{self.codec.name} payload of {size} bytes is not whole samples"
            )
        n = size // bytes_per_sample
        if clock is None:
            clock = self._tracks[track] = _TrackClock(self.max_silence_samples)
        # Until this frame is placed, the next one takes this path too: a frame dropped below
        # as a duplicate may still have moved last_chunk.
        clock.next_chunk = None
        stats = clock.stats
        cursor = clock.cursor
        last_chunk = stats.last_chunk

        skipped = 0
        if chunk is not None and last_chunk is not None:
            if chunk <= last_chunk:
                if chunk in clock.missing:  # reordered: it came after a later chunk
                    clock.missing.discard(chunk)
                    stats.late_frames += 1
                    stats.chunks_missing -= 1
                else:
                    stats.duplicate_frames += 1
                return _NOTHING
            skipped = chunk - last_chunk - 1
            if skipped:
                stats.chunks_missing += skipped
                self._note_missing(clock, last_chunk, chunk)

        if timestamp is not None:
            target = timestamp * self.rate // 1000 - clock.offset
        else:
            target = cursor + skipped * n  # without a chunk either, skipped is 0
        jump = target - cursor
        tolerance = n // 2 if n // 2 > self._one_ms else self._one_ms
        if jump > self.max_gap_samples or (timestamp is not None and -jump > self.max_gap_samples):
            # A clock jump past max_gap_s (a corrupt timestamp or chunk, a clock reset): fill at
            # most max_gap_s and shift the track's clock, rather than write hours of silence
            # or drop every later frame as "already placed".
            stats.clock_jumps += 1
            self.clock_shifts += 1
            jump = self._skip(clock, jump, self.max_gap_samples if jump > 0 else 0, timestamp)
            target = cursor + jump
        if jump > tolerance and jump > clock.silence_left:
            # The track has made all the silence max_silence_s allows: jumps shift its clock.
            stats.silence_capped += 1
            self.clock_shifts += 1
            jump = self._skip(clock, jump, clock.silence_left, timestamp)
            target = cursor + jump
        if target + n > self.max_samples:
            raise LimitExceeded("media placed beyond the max stream duration")

        stats.frames += 1
        stats.bytes += size
        if chunk is not None:
            stats.last_chunk = chunk
            if last_chunk is None:
                stats.first_chunk = chunk
        if timestamp is not None:
            if stats.last_timestamp_ms is None:
                stats.first_timestamp_ms = timestamp
            stats.last_timestamp_ms = timestamp

        # Timestamps are whole ms and may jitter: a frame within half its length (and at least
        # 1 ms) of the cursor continues the track; further away it is a gap or an overlap.
        delta = target - cursor
        out: list[AudioBatch] | None = None
        if delta > tolerance:
            out = [*self._flush_track(track, clock), *self._silence_batches(track, cursor, delta)]
            clock.silence_left -= delta
            if cursor == 0:
                stats.leading_silence_samples += delta
            else:
                stats.gaps += 1
                stats.silence_samples += delta
            cursor = target
            clock.shift = 0
        elif delta < -tolerance:
            # Measure the overlap from where the track's last frame was put, not from its stamp:
            # a jittered frame sent again must not write its tail twice.
            # The shift is held to this frame's own tolerance, so that it still lands within
            # that of its stamp (frames of other sizes have other tolerances); skip stays > 0.
            shift = max(-tolerance, min(clock.shift, tolerance))
            skip = -delta - shift
            if skip >= n:
                stats.duplicate_frames += 1
                return _NOTHING
            stats.overlap_samples_dropped += skip
            payload = payload[skip * bytes_per_sample :]
            n -= skip
            clock.shift = shift
        elif delta < 0 and -delta - clock.shift >= n:
            # Within the allowance of the end, yet wholly behind where the last frame was put:
            # that frame, absorbed as jitter, sent again.
            stats.duplicate_frames += 1
            return _NOTHING
        else:
            clock.shift = cursor - target

        # The next frame takes the fast path if it continues this one: a chunk and a timestamp
        # each, and a tolerance within max_gap_s (no clock jump possible within it).
        if chunk is not None and timestamp is not None and tolerance <= self.max_gap_samples:
            clock.next_chunk = chunk + 1
            clock.frame_bytes = size
            clock.frame_samples = size // bytes_per_sample
            clock.frame_tolerance = tolerance
        _append(clock, payload, n, cursor)
        if clock.pending_samples >= self.batch_samples:
            out = [*(out or ()), *self._flush_track(track, clock)]
        return out if out is not None else _NOTHING

    def flush(self) -> list[AudioBatch]:
        """Everything still pending, for the end of the stream."""
        out: list[AudioBatch] = []
        for track, clock in self._tracks.items():
            out.extend(self._flush_track(track, clock))
        return out

    def on_dtmf(self, event: Dtmf) -> DtmfRecord | None:
        """Record a key press at the current stream time; None past ``max_dtmf`` (counted)."""
        if len(self.dtmf) >= self.max_dtmf:
            self.dropped.dtmf += 1
            return None
        record = DtmfRecord(
            digit=event.digit,
            at_ms=self.position_ms,
            duration_ms=event.duration_ms,
            track=event.track,
        )
        self.dtmf.append(record)
        return record

    def on_mark(self, event: Mark) -> MarkRecord | None:
        """Record a mark at the current stream time; None past ``max_marks`` (counted).

        A name longer than ``max_name_chars`` is cut (and counted): the mark's place is kept.
        """
        if len(self.marks) >= self.max_marks:
            self.dropped.marks += 1
            return None
        name = event.name
        if len(name) > self.max_name_chars:
            name = name[: self.max_name_chars]
            self.dropped.mark_names_cut += 1
        record = MarkRecord(name=name, at_ms=self.position_ms)
        self.marks.append(record)
        return record

    @property
    def position_ms(self) -> float:
        """How far the stream's audio reaches, in ms since its start (the longest track)."""
        longest = max((c.cursor for c in self._tracks.values()), default=0)
        return round(longest * 1000 / self.rate, 3)

    @property
    def track_stats(self) -> dict[Track, TrackStats]:
        """Per-track statistics, in the order the tracks first sent audio."""
        return {track: clock.stats for track, clock in self._tracks.items()}

    def _skip(self, clock: _TrackClock, jump: int, kept: int, timestamp: int | None) -> int:
        """Keep ``kept`` of a jump; timestamps then land that much earlier. Returns ``kept``."""
        if timestamp is not None:
            clock.offset += jump - kept
        clock.stats.clock_jump_skipped_ms += round((jump - kept) * 1000 / self.rate, 3)
        return kept

    @staticmethod
    def _note_missing(clock: _TrackClock, last_chunk: int, chunk: int) -> None:
        """Remember the chunks just skipped, at most ``_LATE_CHUNKS`` behind ``chunk``."""
        floor = max(last_chunk + 1, chunk - _LATE_CHUNKS)
        clock.missing = {c for c in clock.missing if c >= floor}
        clock.missing.update(range(floor, chunk))

    def _flush_track(self, track: Track, clock: _TrackClock) -> Iterator[AudioBatch]:
        if not clock.pending:
            return
        data = clock.pending[0] if len(clock.pending) == 1 else b"".join(clock.pending)
        samples = self.codec.decode(data)
        position = clock.pending_start
        clock.pending = []
        clock.pending_samples = 0
        yield AudioBatch(track, position, samples)

    def _silence_batches(self, track: Track, position: int, count: int) -> Iterator[AudioBatch]:
        step = len(self._silence)
        for offset in range(0, count, step):
            yield AudioBatch(track, position + offset, self._silence[: min(step, count - offset)])
