"""The default sink: one WAV file per track plus ``stream.json``, in a directory per stream.

Layout: ``<recordings_dir>/<streamSid, sanitised>[-N]/{inbound,outbound}.wav`` and
``stream.json``. ``stream.json`` is written when the stream starts (``"status": "recording"``)
and replaced atomically when it ends (``"status": "complete"``), so a reader never sees half a
record.

Crash safety: after every batch the header's sizes are rewritten to match the data, so after a
``kill -9`` each file opens in strict readers (``wave``, sox, browsers) and holds all but the last
batch. 16-bit PCM WAV, the default, is written by ``Pcm16Wav`` (one ``write`` and one ``pwrite``
a batch); FLAC and native G.711 go through libsndfile (``SFC_UPDATE_HEADER_NOW``). While a
stream is live its sink holds an ``flock`` on ``<recordings_dir>/.in-progress/<dir>``; a marker
whose lock is free belongs to a stream a crash interrupted (see ``receiver.recovery``).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import soundfile
from numpy.typing import NDArray

from receiver import __version__
from receiver.events import Track
from receiver.session import DtmfRecord, MarkRecord, is_gap_fill
from receiver.sinks.base import StreamInfo, StreamSummary

if TYPE_CHECKING:
    from receiver.settings import FileFormat, SampleFormat, Settings

RECORD_NAME = "stream.json"
IN_PROGRESS_DIR = ".in-progress"
# libsndfile's sndfile.h: rewrite the header with the current sizes, now. soundfile does not
# name the constant, but passes sf_command through.
_SFC_UPDATE_HEADER_NOW = 0x1060
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_DIR_CHARS = 64
_MAX_SAME_SID = 1000
# Every name make_stream_dir makes (and no other): safe_dirname's, then "-N" for a repeated sid.
STREAM_DIR_PATTERN = re.compile(rf"[A-Za-z0-9_-]{{1,{_MAX_DIR_CHARS + len(f'-{_MAX_SAME_SID}')}}}")
# Native G.711 keeps the platform's bytes; libsndfile encodes our int16 back to the same codes.
_NATIVE_SUBTYPES = {"pcmu": "ULAW", "pcma": "ALAW"}
_RECORD_ENCODER = json.JSONEncoder(indent=2, ensure_ascii=True)
# The one thread that finishes streams (WavSink.aclose), made on the first stream's end and
# kept: streams end in turn, and a burst of ends (a shutdown) costs no more threads than one.
_CLOSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="receiver-wav-close")


def safe_dirname(stream_sid: str) -> str:
    """A directory name for ``stream_sid`` that cannot leave the recordings directory.

    Only ``[A-Za-z0-9_-]`` survive (so no ``.``, ``/``, NUL or unicode), at most 64 characters;
    a sid that had to be changed gets a hash of the original, so that two hostile sids that
    sanitise alike still differ.
    """
    cleaned = _UNSAFE.sub("_", stream_sid)[:_MAX_DIR_CHARS]
    if cleaned == stream_sid and cleaned:
        return cleaned
    digest = hashlib.sha256(stream_sid.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned[: _MAX_DIR_CHARS - 13] or 'stream'}-{digest}"


def make_stream_dir(root: Path, stream_sid: str) -> Path:
    """Create a new directory for the stream; a second stream with the same sid gets ``-2``..."""
    base = safe_dirname(stream_sid)
    for n in range(1, _MAX_SAME_SID + 1):
        candidate = root / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{_MAX_SAME_SID} streams already recorded under {base!r}")


def update_header(file: soundfile.SoundFile) -> None:
    """Make the file's header sizes match the data written so far (libsndfile, in place)."""
    snd, ffi = soundfile._snd, soundfile._ffi  # private, but stable since soundfile 0.8
    snd.sf_command(file._file, _SFC_UPDATE_HEADER_NOW, ffi.NULL, 0)


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """Replace ``path`` with ``record`` so that readers see the old or the new file, whole.

    On failure (a full disk) the old file stays and no ``.tmp`` is left behind.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="ascii") as out:
            # Written piece by piece: no whole copy of a large record in memory, and from a
            # thread (WavSink.aclose) the encoder lets the event loop run between pieces.
            # ensure_ascii: ids and parameters may hold lone surrogates that UTF-8 cannot carry.
            for piece in _RECORD_ENCODER.iterencode(record):
                out.write(piece)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class TrackWriter(Protocol):
    """One track's file: ``append`` a batch, leaving a header that matches; ``close`` at the end."""

    def append(self, samples: NDArray[np.int16]) -> None: ...

    def close(self) -> None: ...


class Pcm16Wav:
    """A mono 16-bit PCM WAV file whose 44-byte header always matches its data.

    Each batch is one ``os.write`` of the samples and one ``pwrite`` of the header: a fraction
    of libsndfile's write and header update, 40 files in turn (``python -m bench.core`` prints
    both and their ratio), and no libsndfile state (~9 KiB) per open file. A file would pass the
    4 GiB a WAV header can count after 74 hours at 8 kHz: writing stops there with an error.
    """

    _HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")
    _MAX_DATA_BYTES = 0xFFFFFFFF - 36

    def __init__(self, path: Path, *, sample_rate_hz: int) -> None:
        self._name = path.name
        self._rate = sample_rate_hz
        self._data_bytes = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            header = self._header()
            self._write_all(header, len(header))
        except BaseException:
            os.close(self._fd)
            raise

    def append(self, samples: NDArray[np.int16]) -> None:
        """Append the samples (little-endian on disk), then make the header count them."""
        data = np.ascontiguousarray(samples, dtype="<i2")
        if self._data_bytes + data.nbytes > self._MAX_DATA_BYTES:
            raise OSError("a WAV file holds at most 4 GiB of audio")
        try:
            if is_gap_fill(samples):
                # Silence the session made for a gap (up to 10 s a slice): the file grows by a
                # hole that reads as zeros instead of by a write of zeros, which would cost the
                # event loop time for every second of silence, and the disk nothing.
                end = self._HEADER.size + self._data_bytes + data.nbytes
                os.ftruncate(self._fd, end)
                os.lseek(self._fd, end, os.SEEK_SET)
            else:
                self._write_all(data.data, data.nbytes)
            os.pwrite(self._fd, self._header(data.nbytes), 0)
        except OSError as exc:  # say which file: errno's text alone does not
            raise OSError(exc.errno, f"writing {self._name} failed: {exc.strerror}") from exc
        self._data_bytes += data.nbytes

    def close(self) -> None:
        """Close the file; its header is already final."""
        os.close(self._fd)

    def _header(self, adding: int = 0) -> bytes:
        size, rate = self._data_bytes + adding, self._rate
        return self._HEADER.pack(
            b"RIFF", 36 + size, b"WAVE", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16, b"data", size
        )

    def _write_all(self, data: bytes | memoryview, size: int) -> None:
        written = os.write(self._fd, data)
        if written < size:  # only when a disk fills up: the next write raises
            rest = memoryview(data).cast("B")[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]


class SndfileTrack:
    """A track written through libsndfile: FLAC, or WAV in the platform's own G.711."""

    def __init__(self, file: soundfile.SoundFile, *, update_header_each_batch: bool) -> None:
        self._file = file
        self._update_header = update_header_each_batch

    def append(self, samples: NDArray[np.int16]) -> None:
        """Append the samples; for WAV, make the header count them."""
        try:
            # buffer_write skips soundfile's array checks (``python -m bench.core``: the ratio).
            self._file.buffer_write(np.ascontiguousarray(samples), dtype="int16")
            if self._update_header:
                update_header(self._file)
        except soundfile.LibsndfileError as exc:  # say which file; libsndfile's text is terse
            name = Path(self._file.name).name
            raise OSError(f"writing {name} failed: {exc.error_string}") from exc

    def close(self) -> None:
        """Finish the file (FLAC writes its last block here)."""
        self._file.close()


class WavSink:
    """Per-track WAV files and the ``stream.json`` record of one stream."""

    # Closed after the other sinks, so that stream.json names their close-time errors too.
    writes_record = True

    def __init__(
        self,
        *,
        recordings_dir: Path,
        sample_format: SampleFormat = "pcm16",
        file_format: FileFormat = "wav",
        stereo: bool = False,
    ) -> None:
        self.recordings_dir = recordings_dir
        self.sample_format = sample_format
        self.file_format = file_format
        self.stereo = stereo
        self.directory: Path | None = None
        self._info: StreamInfo | None = None
        self._files: dict[Track, TrackWriter] = {}
        self._frames: dict[Track, int] = {}
        self._events: list[DtmfRecord | MarkRecord] = []
        self._marker: Path | None = None
        self._marker_fd: int | None = None

    @property
    def location(self) -> str | None:
        """Where the files are, for the stream's last log line."""
        return f"files in {self.directory}" if self.directory else None

    @classmethod
    def from_settings(cls, settings: Settings) -> WavSink:
        """The ``receiver.sinks`` entry point: one sink per stream."""
        return cls(
            recordings_dir=settings.recordings_dir,
            sample_format=settings.sample_format,
            file_format=settings.file_format,
            stereo=settings.stereo,
        )

    def open(self, info: StreamInfo) -> None:
        """Create the stream's directory and its first ``stream.json``."""
        self._info = info
        self.directory = make_stream_dir(self.recordings_dir, info.start.stream_sid)
        self._hold_marker(self.directory)
        write_json_atomic(self.directory / RECORD_NAME, self._record(status="recording"))

    def write(self, track: Track, position: int, samples: NDArray[np.int16]) -> None:
        """Append to ``<track>.wav``, opening it on the track's first batch."""
        file = self._files.get(track) or self._open_track(track)
        written = self._frames[track]
        if position != written:
            raise ValueError(f"{track}: batch at {position}, file holds {written} samples")
        file.append(samples)
        self._frames[track] = written + len(samples)

    def event(self, record: DtmfRecord | MarkRecord) -> None:
        """Kept for ``stream.json``."""
        self._events.append(record)

    async def aclose(self, summary: StreamSummary) -> None:
        """``close`` in a thread: the stereo mix and a ``stream.json`` of thousands of marks
        (3 MB, tens of ms to encode) must not hold the event loop."""
        await asyncio.get_running_loop().run_in_executor(_CLOSER, self.close, summary)

    def close(self, summary: StreamSummary) -> None:
        """Finish every file (and the stereo mix), then write the final ``stream.json``.

        The marker's lock is released whatever fails. When the final ``stream.json`` cannot be
        written (a full disk) the marker stays, unlocked, so that ``receiver repair`` finishes
        the stream later; the error is raised for the caller to log and count.
        """
        errors: list[BaseException] = []
        finished = False
        try:
            for file in self._files.values():
                try:
                    file.close()
                except Exception as exc:  # noqa: BLE001 - finish the other files, then report
                    errors.append(exc)
            if self.stereo and self._files and not errors:
                try:
                    self._mix_stereo()
                except Exception as exc:  # noqa: BLE001 - the mono files stand; report
                    errors.append(exc)
            if self.directory is not None:
                record = self._record(status="complete", summary=summary)
                write_json_atomic(self.directory / RECORD_NAME, record)
            finished = True
        finally:
            self._release_marker(keep=not finished)
        if errors:
            raise errors[0]

    def _mix_stereo(self) -> None:
        """``stereo.<ext>``: inbound left, outbound right, on the shared timeline.

        Made at the end from the track files, a second at a time, so that it costs no memory
        while the stream runs; the shorter track is padded with silence.
        """
        assert self.directory is not None and self._info is not None
        assert self._info.codec is not None
        rate, block = self._info.codec.sample_rate_hz, self._info.codec.sample_rate_hz
        length = max(self._frames.values())
        readers = {
            track: soundfile.SoundFile(self.directory / self._name(track))
            for track in ("inbound", "outbound")
            if track in self._files
        }
        target = self.directory / self._name("stereo")
        try:
            with soundfile.SoundFile(
                target, "w", rate, 2, subtype="PCM_16", format=self._container
            ) as out:
                for start in range(0, length, block):
                    frames = min(block, length - start)
                    mix = np.zeros((frames, 2), dtype=np.int16)
                    for channel, track in enumerate(("inbound", "outbound")):
                        if track in readers:
                            data = readers[track].read(frames, dtype="int16")
                            mix[: len(data), channel] = data
                    out.write(mix)
        finally:
            for reader in readers.values():
                reader.close()

    @property
    def _container(self) -> str:
        return "FLAC" if self.file_format == "flac" else "WAV"

    def _name(self, track: str) -> str:
        return f"{track}.{self.file_format}"

    def _hold_marker(self, directory: Path) -> None:
        """Mark the stream live: a locked file named after its directory."""
        markers = self.recordings_dir / IN_PROGRESS_DIR
        markers.mkdir(exist_ok=True)
        self._marker = markers / directory.name
        self._marker_fd = os.open(self._marker, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        fcntl.flock(self._marker_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _release_marker(self, *, keep: bool = False) -> None:
        """Unlock (close) the marker; remove it unless ``keep`` (left for ``receiver repair``)."""
        try:
            if self._marker is not None and not keep:
                self._marker.unlink(missing_ok=True)
        finally:
            self._marker = None
            if self._marker_fd is not None:
                os.close(self._marker_fd)
                self._marker_fd = None

    def _open_track(self, track: Track) -> TrackWriter:
        assert self._info is not None and self._info.codec is not None and self.directory
        codec = self._info.codec
        path = self.directory / self._name(track)
        subtype = "PCM_16"
        if self.sample_format == "native" and self.file_format == "wav":
            subtype = _NATIVE_SUBTYPES.get(codec.name, "PCM_16")
        file: TrackWriter
        if self.file_format == "wav" and subtype == "PCM_16":
            file = Pcm16Wav(path, sample_rate_hz=codec.sample_rate_hz)
        else:
            sound = soundfile.SoundFile(
                path,
                mode="w",
                samplerate=codec.sample_rate_hz,
                channels=1,
                format=self._container,
                subtype=subtype,
            )
            file = SndfileTrack(sound, update_header_each_batch=self.file_format == "wav")
        self._files[track] = file
        self._frames[track] = 0
        return file

    def _record(self, *, status: str, summary: StreamSummary | None = None) -> dict[str, Any]:
        assert self._info is not None
        record: dict[str, Any] = {"receiver": __version__, "status": status}
        record.update(self._info.as_dict())
        record["unsupported_reason"] = self._info.unsupported_reason
        record["sample_format"] = self.sample_format
        files: dict[str, str] = {track: self._name(track) for track in self._files}
        stereo = self.directory / self._name("stereo") if self.directory else None
        if self.stereo and stereo is not None and stereo.exists():
            files["stereo"] = self._name("stereo")
        record["files"] = files
        if summary is not None:
            record.update(summary.as_dict())
        return record
