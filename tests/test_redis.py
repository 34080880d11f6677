"""The ``redis`` sink against a real ``redis-server``, and ``receiver consume`` in its own process
rebuilding the streams: compared sample by sample with what the ``wav`` sink wrote."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from receiver.codecs import CLI_CODECS, codec_for
from receiver.events import MediaFormat, Start
from receiver.server import Receiver
from receiver.session import DtmfRecord, TrackStats
from receiver.simulate import build_messages, play
from receiver.sinks import WavSink
from receiver.sinks.base import StreamEnd, StreamInfo, StreamSummary
from receiver.sinks.redis.sink import RedisOptions, RedisPublisher, RedisSink, RedisSinkError
from tests.support.audio import read_wav, sox_decode, sox_encode
from tests.support.commands import free_port
from tests.support.receiver import TOKEN, StartReceiver, url, wait_idle
from tests.support.recordings import record_of, recording
from tests.support.redis_server import ConsumeProcess, RedisServer, consume_cmd, redis_factory

PCMU = codec_for(CLI_CODECS["pcmu"])
STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\.[0-9a-f]{8}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; each test keeps to its own key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, to stop or freeze."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def publisher() -> AsyncIterator[Any]:
    """``publisher(url, ...)`` makes a writer thread for a sink used alone; all shut down after."""
    made: list[RedisPublisher] = []

    def make(url: str, *, max_queued_bytes: int = 64 * 1024 * 1024) -> RedisPublisher:
        made.append(RedisPublisher(url=url, max_queued_bytes=max_queued_bytes))
        return made[-1]

    yield make
    for each in made:
        await asyncio.to_thread(each.shutdown, timeout_s=5)


def options(prefix: str, *, flush_timeout_s: float = 2.0) -> RedisOptions:
    return RedisOptions(
        prefix=prefix, maxlen=100_000, ttl_s=86_400, flush_timeout_s=flush_timeout_s
    )


def only_dir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def with_events(messages: list[str]) -> list[str]:
    """``messages`` with a DTMF digit and a mark sent halfway, before ``stop``."""
    dtmf = {"event": "dtmf", "dtmf": {"digit": "7", "duration": 250}}
    mark = {"event": "mark", "mark": {"name": "half-way"}}
    half = len(messages) // 2
    return [*messages[:half], json.dumps(dtmf), json.dumps(mark), *messages[half:]]


async def stream_through(
    start_receiver: StartReceiver,
    client_ssl: ssl.SSLContext,
    messages: list[str],
    factory: Any,
    *,
    pace: float = 0.0,
) -> Receiver:
    """Play ``messages`` into a receiver with the wav and redis sinks; wait until it is idle."""
    receiver = await start_receiver(sink_factories=[("wav", WavSink.from_settings), factory])
    result = await play(
        url(receiver),
        messages,
        token=TOKEN,
        ssl_context=client_ssl,
        pace=pace,
    )
    assert result.close_code == 1000, result
    await wait_idle(receiver)
    return receiver


@pytest.mark.parametrize("codec_name", ["pcmu", "l16-16k"])
async def test_consumer_in_another_process_rebuilds_both_tracks_sample_exact(
    start_receiver: StartReceiver,
    client_ssl: ssl.SSLContext,
    speech: Any,
    tmp_path: Path,
    redis_server: RedisServer,
    prefix: str,
    codec_name: str,
) -> None:
    """Both tracks, rebuilt from Redis by `receiver consume`, equal the wav sink's files."""
    codec = codec_for(CLI_CODECS[codec_name])
    rate = codec.sample_rate_hz
    kind = "ul" if codec_name == "pcmu" else "s16"
    encoded = {t: sox_encode(speech[t].wav[rate], kind, tmp_path / f"{t}.{kind}") for t in speech}
    out = tmp_path / "rebuilt"
    files = ConsumeProcess(
        tmp_path, consume_cmd(redis_server.url, prefix, "-o", out, "--count", "1")
    )
    levels = ConsumeProcess(
        tmp_path,
        consume_cmd(redis_server.url, prefix, "--levels", "--group", "meters", "--count", "1"),
    )
    sid = f"MZ-redis-{codec_name}"
    messages = with_events(build_messages(codec=codec, tracks=encoded, stream_sid=sid))
    factory = ("redis", redis_factory(redis_server.url, prefix))
    receiver = await stream_through(start_receiver, client_ssl, messages, factory)

    await asyncio.to_thread(files.finish)
    printed = await asyncio.to_thread(levels.finish)
    recorded = recording(receiver, sid)
    rebuilt = only_dir(out)
    assert STREAM_ID.fullmatch(rebuilt.name) and rebuilt.name.startswith(sid + ".")
    for track in ("inbound", "outbound"):
        want, want_rate = read_wav(recorded / f"{track}.wav")
        got, got_rate = read_wav(rebuilt / f"{track}.wav")
        assert got_rate == want_rate == rate
        np.testing.assert_array_equal(got, want)
        if kind == "ul":
            np.testing.assert_array_equal(got, sox_decode(tmp_path / f"{track}.ul", "ul"))
        else:
            np.testing.assert_array_equal(got, speech[track].samples(rate))
    record = record_of(rebuilt)
    assert record["status"] == "complete", record["reason"]
    assert [e["type"] for e in record["events"]] == ["dtmf", "mark"]
    assert record["events"][0]["digit"] == "7"
    assert record["start"]["stream_sid"] == sid
    assert record["stop"]["end"]["kind"] == "stop"
    assert record["stop"]["redis"]["complete"] is True
    assert record_of(recorded)["sink_errors"] == []
    # The other group got the same stream: a level line per second of each track, and events.
    assert re.search(r" inbound +0\.0 s +rms +-\d+\.\d dBFS +peak", printed), printed
    assert re.search(r" outbound +1\.0 s +rms", printed), printed
    assert re.search(r" dtmf +\d+\.\d s +7", printed), printed


async def test_dropped_frames_are_rebuilt_as_the_wav_sink_wrote_them(
    start_receiver: StartReceiver,
    client_ssl: ssl.SSLContext,
    speech: Any,
    tmp_path: Path,
    redis_server: RedisServer,
    prefix: str,
) -> None:
    """A dropped run of 50 frames reaches Redis as the receiver's silence: the same samples."""
    encoded = {t: sox_encode(speech[t].wav[8000], "ul", tmp_path / f"{t}.ul") for t in speech}
    out = tmp_path / "rebuilt"
    consumer = ConsumeProcess(
        tmp_path, consume_cmd(redis_server.url, prefix, "-o", out, "--count", "1")
    )
    messages = build_messages(
        codec=PCMU, tracks=encoded, stream_sid="dropped", drop={"inbound": set(range(50, 100))}
    )
    factory = ("redis", redis_factory(redis_server.url, prefix))
    receiver = await stream_through(start_receiver, client_ssl, messages, factory)
    await asyncio.to_thread(consumer.finish)

    recorded, rebuilt = recording(receiver, "dropped"), only_dir(out)
    for track in ("inbound", "outbound"):
        want, _ = read_wav(recorded / f"{track}.wav")
        got, _ = read_wav(rebuilt / f"{track}.wav")
        np.testing.assert_array_equal(got, want)
    inbound, _ = read_wav(rebuilt / "inbound.wav")
    assert not inbound[49 * 160 : 99 * 160].any()
    record = record_of(rebuilt)
    assert record["status"] == "complete"
    assert record["tracks"]["inbound"]["missing_samples"] == 0
    assert record["stop"]["tracks"]["inbound"]["gaps"] == 1


async def test_entries_follow_the_documented_format_and_keys_are_safe(
    start_receiver: StartReceiver,
    client_ssl: ssl.SSLContext,
    speech: Any,
    tmp_path: Path,
    redis_server: RedisServer,
    prefix: str,
) -> None:
    """Keys never carry the client's sid (kept inside entries); fields are as docs/redis.md."""
    encoded = sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")
    sid = "../../etc/x y/\u2603"
    messages = with_events(build_messages(codec=PCMU, tracks={"inbound": encoded}, stream_sid=sid))
    factory = ("redis", redis_factory(redis_server.url, prefix, redis_ttl_s=600))
    await stream_through(start_receiver, client_ssl, messages, factory)

    with redis_server.client() as client:
        keys = sorted(k.decode() for k in client.keys(f"{prefix}:*"))
        control = client.xrange(f"{prefix}:control")
        assert [f[b"type"] for _, f in control] == [b"start", b"dtmf", b"mark", b"stop"]
        stream_id = control[0][1][b"stream_id"].decode()
        assert STREAM_ID.fullmatch(stream_id)
        base = f"{prefix}:stream:{stream_id}"
        assert keys == [f"{prefix}:control", f"{base}:events", f"{base}:inbound"]
        assert all(".." not in k and "/" not in k and k.isascii() for k in keys)
        # The same entries; each stream gives its own ids (the millisecond may turn between).
        assert [f for _, f in client.xrange(f"{base}:events")] == [f for _, f in control]
        assert 0 < client.ttl(f"{base}:inbound") <= 600
        assert client.ttl(f"{prefix}:control") == -1
        for _, fields in control:
            assert fields[b"v"] == b"1"
            assert fields[b"rate"] == b"8000"
            assert json.loads(fields[b"data"])["stream_sid"] == sid
        start = json.loads(control[0][1][b"data"])
        assert start["codec"] == "pcmu"
        assert start["keys"]["inbound"] == f"{base}:inbound"
        dtmf = json.loads(control[1][1][b"data"])
        assert dtmf["digit"] == "7" and dtmf["duration_ms"] == 250
        stop = json.loads(control[3][1][b"data"])
        assert stop["end"]["kind"] == "stop"
        audio = client.xrange(f"{base}:inbound")
    expected = sox_decode(tmp_path / "in.ul", "ul")
    position = 0
    for _, fields in audio:
        assert set(fields) == {b"position", b"rate", b"samples"}
        assert int(fields[b"position"]) == position
        samples = np.frombuffer(fields[b"samples"], dtype="<i2")
        np.testing.assert_array_equal(samples, expected[position : position + len(samples)])
        position += len(samples)
    assert position == len(expected) == stop["redis"]["published_samples"]["inbound"]


async def test_redis_never_started_leaves_wav_complete_and_names_the_error(
    start_receiver: StartReceiver,
    client_ssl: ssl.SSLContext,
    speech: Any,
    tmp_path: Path,
) -> None:
    """With nothing listening at the Redis URL, the wav files are whole and stream.json says so."""
    encoded = sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")[:12_000]
    messages = build_messages(codec=PCMU, tracks={"inbound": encoded}, stream_sid="no-redis")
    factory = ("redis", redis_factory(f"redis://127.0.0.1:{free_port()}/0", "t"))
    receiver = await stream_through(start_receiver, client_ssl, messages, factory, pace=1.0)
    directory = recording(receiver, "no-redis")
    samples, _ = read_wav(directory / "inbound.wav")
    np.testing.assert_array_equal(samples, sox_decode(tmp_path / "in.ul", "ul")[:12_000])
    record = record_of(directory)
    assert record["status"] == "complete"
    assert len(record["sink_errors"]) == 1
    assert "sink 'redis' failed" in record["sink_errors"][0]
    assert "Redis unreachable" in record["sink_errors"][0]
    assert receiver.counters["sink_errors", "redis"] == 1


async def test_a_bad_redis_url_costs_the_redis_sink_only(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """A URL redis-py refuses fails the redis sink at open, without its text (it may hold a
    password); the wav files are whole."""
    encoded = sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")
    messages = build_messages(codec=PCMU, tracks={"inbound": encoded}, stream_sid="bad-url")
    factory = ("redis", redis_factory("redis://:s3cret@localhost:notaport/0", "t"))
    receiver = await stream_through(start_receiver, client_ssl, messages, factory)
    directory = recording(receiver, "bad-url")
    samples, _ = read_wav(directory / "inbound.wav")
    np.testing.assert_array_equal(samples, sox_decode(tmp_path / "in.ul", "ul"))
    errors = record_of(directory)["sink_errors"]
    assert len(errors) == 1 and "open: sink 'redis' failed" in errors[0]
    assert "RECEIVER_REDIS_URL" in errors[0] and "s3cret" not in errors[0]


async def test_redis_stopped_mid_stream_leaves_wav_complete_and_names_the_error(
    start_receiver: StartReceiver,
    client_ssl: ssl.SSLContext,
    speech: Any,
    tmp_path: Path,
    own_redis: RedisServer,
    prefix: str,
) -> None:
    """Redis going away one second into a live stream: wav whole, stream.json names redis."""
    encoded = {
        t: sox_encode(speech[t].wav[8000], "ul", tmp_path / f"{t}.ul")[:24_000] for t in speech
    }
    messages = build_messages(codec=PCMU, tracks=encoded, stream_sid="redis-gone")
    factory = ("redis", redis_factory(own_redis.url, prefix))

    async def stop_redis() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_redis.stop)

    stopper = asyncio.create_task(stop_redis())
    receiver = await stream_through(start_receiver, client_ssl, messages, factory, pace=1.0)
    await stopper
    directory = recording(receiver, "redis-gone")
    for track in ("inbound", "outbound"):
        samples, _ = read_wav(directory / f"{track}.wav")
        np.testing.assert_array_equal(samples, sox_decode(tmp_path / f"{track}.ul", "ul")[:24_000])
    record = record_of(directory)
    assert record["status"] == "complete"
    assert [e for e in record["sink_errors"] if "sink 'redis' failed" in e], record["sink_errors"]
    assert record["tracks"]["inbound"]["samples"] == 24_000


async def said(process: ConsumeProcess, text: str, *, timeout_s: float = 15) -> None:
    """Wait until ``process`` has logged ``text``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while text not in process.stderr.read_text():
        assert asyncio.get_running_loop().time() < deadline, f"no {text!r}: {process.output()}"
        await asyncio.sleep(0.05)


def _info(sid: str) -> StreamInfo:
    fmt = MediaFormat("audio/x-mulaw", 8000)
    start = Start(stream_sid=sid, media_format=fmt, tracks=("inbound",), raw={"streamSid": sid})
    return StreamInfo(
        start=start,
        path="/media",
        query="",
        remote="127.0.0.1",
        started_at=datetime.now(UTC),
        codec=codec_for(fmt),
    )


async def test_slow_redis_drops_old_batches_counts_them_and_consumer_keeps_the_timeline(
    own_redis: RedisServer, tmp_path: Path, prefix: str, publisher: Any
) -> None:
    """A frozen Redis: the queue stays bounded by dropping the oldest batches, counted in the stop
    entry, raised from close and published as a gap; the consumer puts zeros in their place."""
    batch, batches = 1600, 40
    audio = (np.sin(np.arange(batch * batches) / 7) * 8000).astype(np.int16)
    writer = publisher(own_redis.url, max_queued_bytes=20_000)
    sink = RedisSink(writer, options(prefix, flush_timeout_s=0.3))
    own_redis.pause()
    try:
        sink.open(_info("slow"))
        for i in range(batches):
            sink.write("inbound", i * batch, audio[i * batch : (i + 1) * batch])
        sink.event(DtmfRecord("1", 10.0, None, None))
        assert writer.queued_bytes <= 20_000
        dropped = sink._state.dropped_batches if sink._state else 0
        assert 0 < dropped < batches
        summary = StreamSummary(
            end=StreamEnd("stop"),
            ended_at=datetime.now(UTC),
            sample_rate_hz=8000,
            tracks={"inbound": TrackStats(samples=len(audio))},
        )
        with pytest.raises(RedisSinkError, match="dropped"):
            sink.close(summary)
    finally:
        own_redis.resume()
    assert sink._state is not None
    # Counted after close: its stop entry made room by dropping one more batch, maybe.
    dropped, dropped_samples = sink._state.dropped_batches, sink._state.dropped_samples

    out = tmp_path / "rebuilt"
    consumer = ConsumeProcess(
        tmp_path, consume_cmd(own_redis.url, prefix, "-o", out, "--count", "1")
    )
    await asyncio.to_thread(consumer.finish)
    rebuilt = only_dir(out)
    record = record_of(rebuilt)
    assert record["status"] == "incomplete"
    stop = record["stop"]["redis"]
    assert stop["complete"] is False
    assert stop["dropped_batches"] == dropped
    assert stop["dropped_samples"] == dropped * batch == dropped_samples
    assert record["tracks"]["inbound"]["missing_samples"] == dropped_samples
    # The gap entries name exactly the spans that are missing.
    spans = [s for gap in record["outages"] for s in gap["tracks"]["inbound"]]
    assert sum(s["samples"] for s in spans) == dropped_samples
    got, _ = read_wav(rebuilt / "inbound.wav")
    assert len(got) == len(audio)
    with own_redis.client() as client:
        delivered = client.xrange(sink.keys["inbound"])
    kept = np.zeros(len(audio), dtype=bool)
    for _, fields in delivered:
        start = int(fields[b"position"])
        kept[start : start + len(fields[b"samples"]) // 2] = True
    assert kept.sum() == len(audio) - dropped_samples
    for span in spans:
        assert not kept[span["start"] : span["start"] + span["samples"]].any()
    np.testing.assert_array_equal(got[kept], audio[kept])
    assert not got[~kept].any()


async def test_stream_of_a_dead_worker_is_claimed_and_rebuilt_by_another(
    redis_server: RedisServer, tmp_path: Path, prefix: str, publisher: Any
) -> None:
    """While a worker lives its stream stays its own; once it dies another worker of the group
    claims the stream and rebuilds it from its first entry."""
    audio = (np.sin(np.arange(16_000) / 5) * 9000).astype(np.int16)
    sink = RedisSink(publisher(redis_server.url), options(prefix))
    sink.open(_info("claimed"))
    sink.write("inbound", 0, audio[:8000])
    out = tmp_path / "rebuilt"

    def worker(name: str) -> ConsumeProcess:
        args = ("-o", out, "--consumer", name, "--claim-idle-s", "1", "--count", "1")
        return ConsumeProcess(tmp_path, consume_cmd(redis_server.url, prefix, *args))

    first = worker("first")
    await said(first, "following stream")
    second = worker("second")
    await said(second, "working as")
    await asyncio.sleep(2.5)  # 2.5 claim-idle periods: the first worker's heartbeats keep it
    assert "following" not in second.stderr.read_text(), second.output()
    first.proc.kill()
    await asyncio.to_thread(first.proc.wait)
    await said(second, "claimed an abandoned entry")
    sink.write("inbound", 8000, audio[8000:])
    summary = StreamSummary(
        end=StreamEnd("stop"),
        ended_at=datetime.now(UTC),
        sample_rate_hz=8000,
        tracks={"inbound": TrackStats(samples=len(audio))},
    )
    await asyncio.to_thread(sink.close, summary)
    await asyncio.to_thread(second.finish)
    rebuilt = only_dir(out)
    got, _ = read_wav(rebuilt / "inbound.wav")
    np.testing.assert_array_equal(got, audio)
    assert record_of(rebuilt)["status"] == "complete"
    with redis_server.client() as client:
        assert client.xpending(f"{prefix}:control", "receiver-consume")["pending"] == 0


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test with an append-only file: a restart keeps what it had."""
    server = RedisServer(tmp_path / "redis-aof", persistent=True)
    yield server
    server.stop()


async def test_redis_restarted_mid_stream_rebuild_holds_all_outside_the_outage_and_marks_it(
    start_receiver: StartReceiver,
    client_ssl: ssl.SSLContext,
    speech: Any,
    tmp_path: Path,
    persistent_redis: RedisServer,
    prefix: str,
) -> None:
    """Redis down for a while in the middle of a live stream, with a queue too small to hold the
    outage: the wav files are sample-exact, the receiver carries on once Redis is back, and the
    consumer's rebuild equals the wav file everywhere but the spans the gap entries name."""
    encoded = {t: sox_encode(speech[t].wav[8000], "ul", tmp_path / f"{t}.ul") for t in speech}
    messages = build_messages(codec=PCMU, tracks=encoded, stream_sid="restarted")
    out = tmp_path / "rebuilt"
    consumer = ConsumeProcess(
        tmp_path, consume_cmd(persistent_redis.url, prefix, "-o", out, "--count", "1")
    )
    await said(consumer, "working as")
    # 20 kB of queue: well under the outage's audio, so the oldest batches are dropped.
    factory = ("redis", redis_factory(persistent_redis.url, prefix, redis_max_queued_bytes=20_000))
    receiver = await start_receiver(sink_factories=[("wav", WavSink.from_settings), factory])
    loop = asyncio.get_running_loop()
    down, up = asyncio.Event(), asyncio.Event()

    def progress(sent: int, total: int) -> None:
        if sent == total // 4:
            loop.call_soon(down.set)
        if sent == total * 3 // 4:
            loop.call_soon(up.set)

    async def outage() -> None:
        await down.wait()
        await asyncio.to_thread(persistent_redis.stop)
        await up.wait()
        await asyncio.to_thread(persistent_redis.restart)

    restarting = asyncio.create_task(outage())
    result = await play(
        url(receiver),
        messages,
        token=TOKEN,
        ssl_context=client_ssl,
        pace=1.0,
        progress=progress,
    )
    assert result.close_code == 1000, result
    await restarting
    await wait_idle(receiver)
    await asyncio.to_thread(consumer.finish, timeout_s=90)

    recorded, rebuilt = recording(receiver, "restarted"), only_dir(out)
    record = record_of(rebuilt)
    assert record["status"] == "incomplete" and "dropped" in record["reason"], record["reason"]
    assert record["outages"], record
    for track in ("inbound", "outbound"):
        want, _ = read_wav(recorded / f"{track}.wav")
        np.testing.assert_array_equal(want, sox_decode(tmp_path / f"{track}.ul", "ul"))
        got, _ = read_wav(rebuilt / f"{track}.wav")
        assert len(got) == len(want)
        lost = np.zeros(len(want), dtype=bool)
        for gap in record["outages"]:
            for span in gap["tracks"].get(track, []):
                lost[span["start"] : span["start"] + span["samples"]] = True
        np.testing.assert_array_equal(got[~lost], want[~lost])
        assert not got[lost].any()
    assert any(gap["tracks"] for gap in record["outages"])
    assert record["stop"]["redis"]["dropped_batches"] > 0
    figures = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in receiver.metrics.render().splitlines()
        if line.startswith("receiver_redis_")
    }
    assert figures["receiver_redis_retries_total"] > 0
    assert (
        figures["receiver_redis_dropped_batches_total"]
        == record["stop"]["redis"]["dropped_batches"]
    )
    assert figures["receiver_redis_down"] == 0
