"""The web page's parts without a browser: the levels sink, the recordings index, file names."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from receiver.codecs import codec_for
from receiver.events import MediaFormat, Start
from receiver.sinks import Fanout, StreamInfo, WavSink
from receiver.sinks.base import StreamEnd, StreamSummary
from receiver.web.levels import LiveLevels
from receiver.web.recordings import RecordingsIndex, resolve_file
from tests.conftest import make_settings


def test_levels_are_rms_and_peak_of_the_latest_batch() -> None:
    """The levels sink keeps the RMS and peak of the last batch per track, and forgets the
    stream when it ends; as an observer it does not keep a failed recording alive."""
    media_format = MediaFormat("audio/x-mulaw", 8000)
    info = StreamInfo(
        start=Start(stream_sid="MZ1", media_format=media_format, tracks=("inbound",)),
        path="/",
        query="",
        remote="127.0.0.1",
        started_at=datetime.now(UTC),
        codec=codec_for(media_format),
    )
    levels = LiveLevels()
    _, factory = levels.sink()
    sink = factory(make_settings(Path()))
    sink.open(info)
    wave = (0.5 * 32767 * np.sin(np.arange(1600) * 2 * np.pi / 80)).astype(np.int16)
    sink.write("inbound", 0, wave)
    (live,) = levels.snapshot()
    assert live["tracks"]["inbound"]["rms"] == pytest.approx(0.5 / np.sqrt(2), abs=1e-3)
    assert live["tracks"]["inbound"]["peak"] == pytest.approx(0.5, abs=1e-3)
    assert live["duration_s"] == 0.2
    sink.close(StreamSummary(end=StreamEnd("stop"), ended_at=info.started_at, sample_rate_hz=8000))
    assert levels.snapshot() == []
    broken = WavSink(recordings_dir=Path("/nonexistent/recordings"))
    fanout = Fanout(
        [("wav", broken), ("web", factory(make_settings(Path())))], logger=logging.getLogger("t")
    )
    fanout.open(info)
    assert fanout.errors and not fanout.alive


async def test_the_index_reads_only_the_newest_directories(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past `max_listed` stream directories, the oldest are not read; it is counted and
    logged once; unchanged records are not read again."""
    for n in range(5):
        directory = tmp_path / f"stream-{n}"
        directory.mkdir()
        record = {"stream_sid": f"s{n}", "started_at": f"2026-01-0{n + 1}T00:00:00+00:00"}
        (directory / "stream.json").write_text(json.dumps(record))
        os.utime(directory / "stream.json", (1_000_000 + n, 1_000_000 + n))
    (tmp_path / "not a stream").mkdir()
    index = RecordingsIndex(tmp_path, max_listed=3, refresh_s=0)
    total, rows = await index.search(offset=0, limit=10)
    assert (total, [r["stream_sid"] for r in rows]) == (3, ["s4", "s3", "s2"])
    assert index.not_listed == 2
    assert "2 stream directories past RECEIVER_UI_MAX_LISTED=3" in caplog.text
    await asyncio.gather(index.listing(), index.listing())
    assert index.scans == 2  # two requests at once share one scan


@pytest.mark.parametrize(
    ("directory", "name"),
    [
        ("..", "stream.json"),
        ("a", "../stream.json"),
        ("/etc", "passwd"),
        ("a/b", "x.wav"),
        ("a", ".hidden.wav"),
        ("a", "x.txt"),
        ("", "x.wav"),
        ("a", "x.wav\x00"),
    ],
)
def test_resolve_file_refuses_anything_but_names(tmp_path: Path, directory: str, name: str) -> None:
    """Directory and file names are matched against strict patterns before any file access."""
    (tmp_path / "a").mkdir()
    assert resolve_file(tmp_path, directory, name) is None
