"""The web page's parts without a browser: the levels sink, the recordings index, file names."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from receiver.codecs import codec_for
from receiver.events import MediaFormat, Start
from receiver.sinks import Fanout, StreamInfo, WavSink
from receiver.sinks.base import StreamEnd, StreamSummary
from receiver.web import WebUI
from receiver.web.auth import LoginThrottle, Sessions
from receiver.web.levels import LiveLevels
from receiver.web.recordings import RecordingsIndex, resolve_file
from tests.support.receiver import TOKEN, make_settings


def _stream_info() -> StreamInfo:
    media_format = MediaFormat("audio/x-mulaw", 8000)
    return StreamInfo(
        start=Start(stream_sid="MZ1", media_format=media_format, tracks=("inbound",)),
        path="/",
        query="",
        remote="127.0.0.1",
        started_at=datetime.now(UTC),
        codec=codec_for(media_format),
    )


def test_levels_are_rms_and_peak_of_the_latest_batch() -> None:
    """The levels sink keeps the RMS and peak of the last batch per track, and forgets the
    stream when it ends; as an observer it does not keep a failed recording alive."""
    info = _stream_info()
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


def test_sessions_are_signed_bounded_and_end_on_logout() -> None:
    """A cookie is accepted only unaltered, unexpired and while its session is open; the
    oldest session goes first past ``max_sessions``."""
    sessions = Sessions(lifetime_s=3600, max_sessions=3)
    cookies = [sessions.create() for _ in range(4)]
    assert len(sessions) == 3
    assert sessions.check(cookies[0]) is None  # the oldest was ended for the fourth
    assert all(sessions.check(c) for c in cookies[1:])
    session_id, expiry, signature = cookies[1].split(".")
    assert sessions.check(f"{session_id}.{int(expiry) + 3600}.{signature}") is None
    altered = signature[:-1] + ("1" if signature.endswith("0") else "0")
    assert sessions.check(f"{session_id}.{expiry}.{altered}") is None
    assert sessions.check(f"other.{expiry}.{signature}") is None
    assert sessions.check(Sessions(lifetime_s=3600).create()) is None  # another key
    sessions.end(session_id)
    assert sessions.check(cookies[1]) is None
    assert Sessions(lifetime_s=-1).check(Sessions(lifetime_s=-1).create()) is None


async def test_failed_logins_wait_longer_each_time_and_addresses_are_bounded() -> None:
    """The n-th failure from an address waits base * 2**(n-1), capped; a success forgets;
    at most ``max_addresses`` are remembered."""
    throttle = LoginThrottle(base_delay_s=0.01, max_delay_s=0.04, max_addresses=2)
    assert [await throttle.failed("a") for _ in range(4)] == [1, 2, 3, 4]
    started = time.monotonic()
    await throttle.failed("a")
    assert time.monotonic() - started >= 0.04  # capped at max_delay_s
    throttle.succeeded("a")
    assert await throttle.failed("a") == 1
    await throttle.failed("b")
    await throttle.failed("c")
    assert await throttle.failed("a") == 1  # "a" was forgotten for "c"
    assert throttle.failed_total == 9


async def test_live_views_are_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Past ``max_event_streams`` open live views, another gets 503, counted and logged; the
    page answers on its own port beside nothing else, and stops with its views open."""
    ui = WebUI(make_settings(tmp_path, ui_port=0))
    ui.app.config = dataclasses.replace(ui.app.config, max_event_streams=2)
    await ui.start()
    try:
        base = f"http://127.0.0.1:{ui.port}"
        async with httpx.AsyncClient(base_url=base) as client:
            answer = await client.post("/login", data={"token": TOKEN}, headers={"Origin": base})
            assert answer.status_code == 303 and "receiver_session" in client.cookies
            assert "secure" not in answer.headers["set-cookie"].lower()  # plain HTTP here
            async with (
                client.stream("GET", "/api/live/events") as first,
                client.stream("GET", "/api/live/events") as second,
            ):
                assert (first.status_code, second.status_code) == (200, 200)
                lines = first.aiter_lines()
                assert await anext(lines) == "retry: 1000"
                third = await client.get("/api/live/events")
                assert third.status_code == 503
                assert ui.app.counters["event_streams_refused"] == 1
                assert "refused a live view, 2 already open" in caplog.text
    finally:
        await ui.stop()


async def test_a_taken_port_stops_serving_with_1(tmp_path: Path) -> None:
    """When the page's port is taken, ``serving`` logs it and returns 1 without running."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        ui = WebUI(make_settings(tmp_path, ui_port=port))
        ran = []

        async def main() -> int:
            ran.append(True)
            return 0

        assert await ui.serving(main()) == 1
        assert not ran


async def test_ui_tokens_replace_the_stream_tokens_for_the_login(tmp_path: Path) -> None:
    """With RECEIVER_UI_TOKENS set, only those log in: a stream token is refused (401)."""
    ui_token = "page-only-token-0123456789"
    ui = WebUI(make_settings(tmp_path, ui_port=0, ui_tokens=[ui_token]))
    ui.app.throttle.base_delay_s = 0.01
    await ui.start()
    try:
        base = f"http://127.0.0.1:{ui.port}"
        async with httpx.AsyncClient(base_url=base, headers={"Origin": base}) as client:
            refused = await client.post("/login", data={"token": TOKEN})
            assert refused.status_code == 401 and not client.cookies
            accepted = await client.post("/login", data={"token": ui_token})
            assert accepted.status_code == 303 and "receiver_session" in client.cookies
            assert (await client.get("/api/streams")).status_code == 200
    finally:
        await ui.stop()


def test_a_waveform_covers_the_whole_file_however_many_silences_it_has(tmp_path: Path) -> None:
    """A call with more pauses than the page marks (G.711 silence decodes to 0) still gets its
    whole envelope; only the marked pauses are bounded."""
    import soundfile

    from receiver.web.recordings import envelope

    rate, points = 8000, 50
    # 600 s: 40 ms of tone, then 40 ms of exact zeros, over and over (7,500 pauses).
    tone = (np.sin(np.arange(320) * 0.3) * 8000).astype(np.int16)
    pattern = np.concatenate([tone, np.zeros(320, dtype=np.int16)])
    audio = np.tile(pattern, 600 * rate // len(pattern))
    path = tmp_path / "inbound.wav"
    soundfile.write(path, audio, rate, subtype="PCM_16")
    shape = envelope(path, points=points, total_samples=len(audio))
    assert len(shape["min"]) == len(shape["max"]) == points
    assert all(high > 0.2 for high in shape["max"])  # tone in every bucket, to the end
    assert len(shape["silence_s"]) == 2 * points  # the marked pauses are capped


async def test_a_stream_with_only_watchers_left_is_no_longer_recorded(tmp_path: Path) -> None:
    """Neither the levels sink nor the delivery sink records audio: once the wav sink failed,
    the stream counts as failed (1011) with them beside it."""
    from prometheus_client import CollectorRegistry

    from receiver.delivery import Delivery

    settings = make_settings(tmp_path, upload_url=f"file://{tmp_path / 'store'}")
    delivery = Delivery()
    await delivery.start(settings, registry=CollectorRegistry())
    try:
        _, web_factory = LiveLevels().sink()
        broken = WavSink(recordings_dir=Path("/nonexistent/recordings"))
        watchers = [("web", web_factory(settings)), ("delivery", delivery(settings))]
        fanout = Fanout([("wav", broken), *watchers], logger=logging.getLogger("t"))
        fanout.open(_stream_info())
        assert [name for name, _ in fanout._live] == ["web", "delivery"]  # both opened
        assert fanout.errors and not fanout.alive
    finally:
        await delivery.stop()


async def test_the_page_binds_an_ipv6_address(tmp_path: Path) -> None:
    """RECEIVER_UI_HOST=::1 serves the login page on IPv6 loopback (it failed to listen)."""
    ui = WebUI(make_settings(tmp_path, ui_host="::1", ui_port=0))
    await ui.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://[::1]:{ui.port}") as client:
            assert (await client.get("/login")).status_code == 200
    finally:
        await ui.stop()


def test_a_live_row_carries_only_what_it_shows() -> None:
    """99 custom parameters of 4,096 characters are not sent to every live view ten times a
    second: the row holds the page's 20, each cut to 200 characters, like the list's."""
    params = {f"p{n}": "v" * 4096 for n in range(99)}
    info = _stream_info()
    info = dataclasses.replace(
        info, start=dataclasses.replace(info.start, custom_parameters=params)
    )
    levels = LiveLevels()
    _, factory = levels.sink()
    factory(make_settings(Path())).open(info)
    (live,) = levels.snapshot()
    assert len(live["custom_parameters"]) == 20
    assert {len(v) for v in live["custom_parameters"].values()} == {200}
    assert len(json.dumps(live)) < 6_000
