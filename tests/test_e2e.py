"""End to end: a real receiver on loopback over real TLS, the simulator as the platform, and
the WAV files read back with soundfile and compared sample by sample with sox's decoding."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from receiver.codecs import CLI_CODECS, codec_for
from receiver.events import MediaFormat
from receiver.server import Receiver
from receiver.simulate import build_messages, play
from tests.support.audio import read_wav, sox_decode, sox_encode
from tests.support.http import http_get, metric
from tests.support.receiver import OTHER_TOKEN, TOKEN, StartReceiver, url, wait_idle
from tests.support.recordings import list_tree, record_of, recording
from tests.support.waits import until
from tests.support.wire import start_frame, upgrade_request, ws_frame

PCMU = codec_for(CLI_CODECS["pcmu"])
PCMA = codec_for(CLI_CODECS["pcma"])


async def test_pcmu_both_tracks_sample_exact(
    receiver: Receiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """μ-law from sox on both tracks is recorded sample-exact on one shared timeline."""
    encoded = {t: sox_encode(speech[t].wav[8000], "ul", tmp_path / f"{t}.ul") for t in speech}
    expected = {t: sox_decode(tmp_path / f"{t}.ul", "ul") for t in speech}
    messages = build_messages(
        codec=PCMU, tracks=encoded, stream_sid="MZ-pcmu-both", custom_parameters={"room": "42"}
    )
    result = await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    assert result.close_code == 1000
    directory = recording(receiver, "MZ-pcmu-both")
    for track in ("inbound", "outbound"):
        samples, rate = read_wav(directory / f"{track}.wav")
        assert rate == 8000
        np.testing.assert_array_equal(samples, expected[track])
    record = record_of(directory)
    assert record["status"] == "complete"
    assert record["end"]["kind"] == "stop"
    assert record["custom_parameters"] == {"room": "42"}
    assert record["tracks"]["inbound"]["samples"] == len(expected["inbound"])
    assert record["tracks"]["inbound"]["gaps"] == 0


async def test_pcma_sample_exact(
    receiver: Receiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """A-law from sox is recorded sample-exact."""
    encoded = sox_encode(speech["inbound"].wav[8000], "al", tmp_path / "in.al")
    expected = sox_decode(tmp_path / "in.al", "al")
    messages = build_messages(codec=PCMA, tracks={"inbound": encoded}, stream_sid="pcma")
    await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    samples, rate = read_wav(recording(receiver, "pcma") / "inbound.wav")
    assert rate == 8000
    np.testing.assert_array_equal(samples, expected)


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
async def test_l16_little_endian_sample_exact(
    receiver: Receiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path, rate: int
) -> None:
    """L16 (little-endian, the default) at 8/16/24 kHz from sox is recorded sample-exact."""
    encoded = sox_encode(speech["inbound"].wav[rate], "s16", tmp_path / "in.s16")
    codec = codec_for(MediaFormat("audio/x-L16", rate))
    sid = f"l16-{rate}"
    messages = build_messages(codec=codec, tracks={"inbound": encoded}, stream_sid=sid)
    await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    samples, file_rate = read_wav(recording(receiver, sid) / "inbound.wav")
    assert file_rate == rate
    np.testing.assert_array_equal(samples, speech["inbound"].samples(rate))


async def test_l16_big_endian_setting(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """With RECEIVER_L16_BYTE_ORDER=big, big-endian L16 (RTP order) is recorded sample-exact."""
    receiver = await start_receiver(l16_byte_order="big")
    raw = tmp_path / "in.s16be"
    from tests.support.audio import run

    run("sox", speech["inbound"].wav[16000], "-t", "s16", "-e", "signed-integer", "-B", raw)
    codec = codec_for(MediaFormat("audio/l16", 16000), l16_byte_order="big")
    messages = build_messages(codec=codec, tracks={"inbound": raw.read_bytes()}, stream_sid="be")
    await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    samples, _ = read_wav(recording(receiver, "be") / "inbound.wav")
    np.testing.assert_array_equal(samples, speech["inbound"].samples(16000))


async def test_twilio_layout_and_native_mulaw(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """Twilio's layout is accepted, and sample_format=native keeps μ-law bytes as μ-law WAV."""
    receiver = await start_receiver(sample_format="native")
    encoded = sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")
    messages = build_messages(
        codec=PCMU, tracks={"inbound": encoded}, stream_sid="MZtwilio", layout="twilio"
    )
    await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    import soundfile

    wav = recording(receiver, "MZtwilio") / "inbound.wav"
    assert soundfile.info(str(wav)).subtype == "ULAW"
    samples, _ = read_wav(wav)
    np.testing.assert_array_equal(samples, sox_decode(tmp_path / "in.ul", "ul"))


async def test_dropped_frames_become_exact_silence_and_tracks_stay_aligned(
    receiver: Receiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """A dropped run of 50 inbound frames is 8000 zero samples; both tracks keep one timeline."""
    encoded = {t: sox_encode(speech[t].wav[8000], "ul", tmp_path / f"{t}.ul") for t in speech}
    expected = {t: sox_decode(tmp_path / f"{t}.ul", "ul") for t in speech}
    lost = range(50, 100)  # chunks 50..99: samples 49*160 .. 99*160
    messages = build_messages(
        codec=PCMU, tracks=encoded, stream_sid="dropped", drop={"inbound": set(lost)}
    )
    await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    directory = recording(receiver, "dropped")
    inbound, _ = read_wav(directory / "inbound.wav")
    outbound, _ = read_wav(directory / "outbound.wav")
    want = expected["inbound"].copy()
    want[49 * 160 : 99 * 160] = 0
    np.testing.assert_array_equal(inbound, want)
    np.testing.assert_array_equal(outbound, expected["outbound"])
    stats = record_of(directory)["tracks"]["inbound"]
    assert stats["gaps"] == 1
    assert stats["silence_samples"] == 50 * 160
    assert stats["chunks_missing"] == 50


async def test_close_without_stop_keeps_every_sample(
    receiver: Receiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """A hang-up without ``stop`` still leaves every received sample in a finished WAV."""
    encoded = sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")
    messages = build_messages(
        codec=PCMU, tracks={"inbound": encoded}, stream_sid="hangup", stop=False
    )
    await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    await wait_idle(receiver)
    directory = recording(receiver, "hangup")
    samples, _ = read_wav(directory / "inbound.wav")
    np.testing.assert_array_equal(samples, sox_decode(tmp_path / "in.ul", "ul"))
    end = record_of(directory)["end"]
    assert end["kind"] == "client-close"
    assert end["close_code"] == 1000


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
    ],
    ids=["none", "wrong", "basic-scheme", "empty-bearer", "longer", "prefix"],
)
async def test_bad_token_is_401_and_writes_nothing(
    receiver: Receiver, client_ssl: ssl.SSLContext, headers: dict[str, str]
) -> None:
    """No, malformed or wrong bearer token: HTTP 401 before the upgrade, nothing on disk."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(url(receiver), ssl=client_ssl, additional_headers=headers):
            pass
    assert info.value.response.status_code == 401
    assert list_tree(receiver) == []
    assert receiver.counters["handshake_rejections", "auth"] == 1


async def test_token_in_query_string_is_not_accepted(
    receiver: Receiver, client_ssl: ssl.SSLContext
) -> None:
    """A token in the query string is not a credential: 401."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(url(receiver, f"/media?token={TOKEN}"), ssl=client_ssl):
            pass
    assert info.value.response.status_code == 401


async def test_every_configured_token_is_accepted(
    receiver: Receiver, client_ssl: ssl.SSLContext
) -> None:
    """Both tokens of a rotation are accepted."""
    for token in (TOKEN, OTHER_TOKEN):
        result = await play(url(receiver), [], token=token, ssl_context=client_ssl)
        assert result.close_code == 1000


async def test_plain_ws_to_tls_port_fails(receiver: Receiver, client_ssl: ssl.SSLContext) -> None:
    """Plain ws:// to the TLS port does not connect; the server stays healthy."""
    with pytest.raises(InvalidMessage, match="did not receive a valid HTTP response"):
        async with connect(
            url(receiver, scheme="ws"),
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
            open_timeout=5,
        ):
            pass
    assert list_tree(receiver) == []
    assert await healthz(receiver, client_ssl) == 200


async def healthz(receiver: Receiver, context: ssl.SSLContext) -> int:
    """GET /healthz over TLS without a token; returns the status."""
    return (await http_get(receiver.port, "/healthz", context))[0]


async def test_healthz_without_token(receiver: Receiver, client_ssl: ssl.SSLContext) -> None:
    """/healthz answers 200 without a token, and 503 once the server is draining."""
    assert await healthz(receiver, client_ssl) == 200
    receiver.draining = True
    assert await healthz(receiver, client_ssl) == 503


async def test_stream_limit_answers_503(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """Past max_streams, a new stream gets HTTP 503 at the handshake."""
    receiver = await start_receiver(max_streams=1)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(url(receiver), ssl=client_ssl, additional_headers=headers):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url(receiver), ssl=client_ssl, additional_headers=headers):
                pass
    assert info.value.response.status_code == 503


async def send_raw(receiver: Receiver, context: ssl.SSLContext, frames: list[str | bytes]) -> Any:
    """Send frames on one connection and return the close frame the server sent."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(url(receiver), ssl=context, additional_headers=headers) as ws:
        for frame in frames:
            await ws.send(frame)
        async with asyncio.timeout(10):
            await ws.wait_closed()
    return ws.close_code, ws.close_reason


@pytest.mark.parametrize(
    ("bad", "code", "words"),
    [
        ("{not json", 1007, "not JSON"),
        ('["a list"]', 1007, "JSON object"),
        ('{"event": "media", "media": {"track": "inbound", "payload": "!!!"}}', 1007, "base64"),
        (
            '{"event": "media", "media": {"track": "inbound", "chunk": "x", "payload": ""}}',
            1007,
            "chunk",
        ),
        ('{"event": "media", "media": {"track": "sideways", "payload": ""}}', 1007, "track"),
        (start_frame("again"), 1008, "start"),
        (b"\x00\x01binary", 1003, "binary"),
    ],
    ids=["json", "not-object", "base64", "chunk-type", "track", "second-start", "binary"],
)
async def test_bad_frame_closes_with_reason_and_keeps_audio(
    receiver: Receiver,
    client_ssl: ssl.SSLContext,
    speech: Any,
    tmp_path: Path,
    bad: str | bytes,
    code: int,
    words: str,
) -> None:
    """A bad frame mid-stream closes that stream with a fitting code; audio before it is kept."""
    encoded = sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")
    messages = build_messages(
        codec=PCMU, tracks={"inbound": encoded[:8000]}, stream_sid="bad", stop=False
    )
    close_code, reason = await send_raw(receiver, client_ssl, [*messages, bad])
    assert close_code == code
    assert words in reason
    await wait_idle(receiver)
    directory = recording(receiver, "bad")
    samples, _ = read_wav(directory / "inbound.wav")
    np.testing.assert_array_equal(samples, sox_decode(tmp_path / "in.ul", "ul")[:8000])
    record = record_of(directory)
    assert record["end"]["kind"] == "protocol-error"
    assert record["end"]["close_code"] == code
    assert receiver.counters["protocol_errors"] == 1


async def test_media_before_start_is_1008(receiver: Receiver, client_ssl: ssl.SSLContext) -> None:
    """Media before start closes with 1008 and creates nothing."""
    media = '{"event": "media", "media": {"track": "inbound", "payload": "AAAA"}}'
    code, reason = await send_raw(receiver, client_ssl, [media])
    assert (code, "before" in reason or "awaiting" in reason) == (1008, True)
    assert list_tree(receiver) == []


async def test_odd_l16_payload_is_1007(receiver: Receiver, client_ssl: ssl.SSLContext) -> None:
    """An L16 payload of an odd number of bytes closes with 1007."""
    bad = json.dumps({"event": "media", "media": {"track": "inbound", "payload": "AAAA"}})
    code, reason = await send_raw(
        receiver, client_ssl, [start_frame("odd", "audio/x-L16", 16000), bad]
    )
    assert code == 1007
    assert "3 bytes" in reason


async def test_unsupported_encoding_is_1003_with_a_record(
    receiver: Receiver, client_ssl: ssl.SSLContext
) -> None:
    """G.722 closes with 1003 naming it, and stream.json says why nothing was recorded."""
    code, reason = await send_raw(receiver, client_ssl, [start_frame("g722", "audio/G722", 16000)])
    assert code == 1003
    assert "G722" in reason
    await wait_idle(receiver)
    record = record_of(recording(receiver, "g722"))
    assert "G722" in record["unsupported_reason"]
    assert record["files"] == {}
    assert record["end"]["kind"] == "protocol-error"


async def test_bad_stream_beside_good_one_leaves_good_one_intact(
    receiver: Receiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """A malformed stream next to a live one closes alone; the live one is recorded whole."""
    encoded = sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")
    good = build_messages(codec=PCMU, tracks={"inbound": encoded}, stream_sid="good")
    good_play = asyncio.create_task(
        play(url(receiver), good, token=TOKEN, ssl_context=client_ssl, pace=0.1)
    )
    bad = [start_frame("bad"), "{garbage"]
    code, _ = await send_raw(receiver, client_ssl, bad)
    assert code == 1007
    assert not good_play.done()
    result = await good_play
    assert result.close_code == 1000
    samples, _ = read_wav(recording(receiver, "good") / "inbound.wav")
    np.testing.assert_array_equal(samples, sox_decode(tmp_path / "in.ul", "ul"))
    assert await healthz(receiver, client_ssl) == 200


HOSTILE_SIDS = [
    "../../escape",
    "/etc/passwd",
    "..",
    ".",
    "a\x00b",
    "x" * 10_000,
    "ünïcødé/..\\..\\",
    "CON",
    "~root",
]


async def test_hostile_stream_sids_stay_inside_recordings(
    receiver: Receiver, client_ssl: ssl.SSLContext, tmp_path: Path
) -> None:
    """Hostile stream sids never leave the recordings dir and are kept verbatim in stream.json."""
    root = receiver.settings.recordings_dir
    outside_before = sorted(p for p in tmp_path.rglob("*") if root not in p.parents)
    payload = PCMU.encode(np.arange(-800, 800, dtype=np.int16))
    for sid in HOSTILE_SIDS:
        messages = build_messages(codec=PCMU, tracks={"inbound": payload}, stream_sid=sid)
        result = await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
        assert result.close_code == 1000, sid
    outside_after = sorted(p for p in tmp_path.rglob("*") if root not in p.parents)
    assert outside_after == outside_before
    assert not list((root / ".in-progress").iterdir())  # every stream finished
    directories = [p for p in root.iterdir() if p.name != ".in-progress"]
    assert len(directories) == len(HOSTILE_SIDS)
    sids = set()
    for directory in directories:
        assert directory.parent == root
        assert len(directory.name) <= 64
        assert (directory / "inbound.wav").is_file()
        sids.add(record_of(directory)["stream_sid"])
    assert sids == set(HOSTILE_SIDS)


async def test_lone_surrogate_in_json_is_1007(
    receiver: Receiver, client_ssl: ssl.SSLContext
) -> None:
    """A string with a lone UTF-16 surrogate is not valid JSON text: 1007, nothing written."""
    code, reason = await send_raw(receiver, client_ssl, [start_frame("\ud800lone")])
    assert code == 1007 and "surrogate" in reason
    assert list_tree(receiver) == []


async def test_same_stream_sid_twice_never_overwrites(
    receiver: Receiver, client_ssl: ssl.SSLContext
) -> None:
    """A second stream with the same sid gets its own directory."""
    for value in (100, 200):
        audio = PCMU.encode(np.full(1600, value, dtype=np.int16))
        messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="dup")
        await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    root = receiver.settings.recordings_dir
    first, _ = read_wav(root / "dup" / "inbound.wav")
    second, _ = read_wav(root / "dup-2" / "inbound.wav")
    assert first[0] != second[0]


async def test_stream_json_holds_parameters_dtmf_marks_stats_and_end(
    receiver: Receiver, client_ssl: ssl.SSLContext
) -> None:
    """stream.json keeps ids, path and query, parameters, timed DTMF, marks and statistics."""
    audio = PCMU.encode(np.zeros(8000, dtype=np.int16))  # 1 s, 50 frames
    messages = build_messages(
        codec=PCMU,
        tracks={"inbound": audio, "outbound": audio},
        stream_sid="meta",
        account_sid="acct-1",
        call_sid="call-1",
        custom_parameters={"FirstName": "Jane", "room": "42"},
        stop=False,
    )
    dtmf = json.dumps(
        {"event": "dtmf", "sequenceNumber": "500", "dtmf": {"digit": "5", "duration": 2000}}
    )
    mark = json.dumps({"event": "mark", "mark": {"name": "greeting-done"}})
    unknown = json.dumps({"event": "sparkle", "sparkle": {}})
    stop = json.dumps({"event": "stop", "sequenceNumber": "999"})
    frames = [*messages[:52], dtmf, mark, unknown, *messages[52:], stop]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    target = url(receiver, "/conf/room-42?tenant=acme")
    async with connect(target, ssl=client_ssl, additional_headers=headers) as ws:
        for frame in frames:
            await ws.send(frame)
        await ws.wait_closed()
    record = record_of(recording(receiver, "meta"))
    assert record["path"] == "/conf/room-42"
    assert record["query"] == "tenant=acme"
    assert (record["account_sid"], record["call_sid"]) == ("acct-1", "call-1")
    assert record["custom_parameters"] == {"FirstName": "Jane", "room": "42"}
    assert record["media_format"] == {
        "encoding": "audio/x-mulaw",
        "sample_rate_hz": 8000,
        "channels": 1,
    }
    # 50 frames went before the dtmf: 25 per track, 25 * 20 ms = 500 ms.
    assert record["dtmf"] == [{"digit": "5", "at_ms": 500.0, "duration_ms": 2000, "track": None}]
    assert record["marks"] == [{"name": "greeting-done", "at_ms": 500.0}]
    assert record["unknown_events"] == ["sparkle"]
    assert record["end"] == {"kind": "stop", "close_code": 1000, "reason": None}
    for track in ("inbound", "outbound"):
        stats = record["tracks"][track]
        assert stats["frames"] == 50
        assert stats["samples"] == 8000
        assert stats["duration_s"] == 1.0
        assert stats["gaps"] == 0
    assert record["files"] == {"inbound": "inbound.wav", "outbound": "outbound.wav"}


async def test_shutdown_closes_with_1001_and_finishes_files(
    receiver: Receiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """Shutdown closes live streams with 1001 and leaves readable WAVs with every sample."""
    encoded = sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")
    messages = build_messages(
        codec=PCMU, tracks={"inbound": encoded}, stream_sid="live", stop=False
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(url(receiver), ssl=client_ssl, additional_headers=headers) as ws:
        for frame in messages:
            await ws.send(frame)
        await until(lambda: receiver.frames_received >= len(messages) - 2)
        await receiver.shutdown(drain_timeout_s=0)
        await ws.wait_closed()
    assert ws.close_code == 1001
    directory = recording(receiver, "live")
    samples, _ = read_wav(directory / "inbound.wav")
    np.testing.assert_array_equal(samples, sox_decode(tmp_path / "in.ul", "ul"))
    assert record_of(directory)["end"]["kind"] == "shutdown"


async def test_oversized_message_is_1009_and_keeps_audio(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """A message over max_message_bytes closes with 1009; the audio before it is kept."""
    receiver = await start_receiver(max_message_bytes=4096)
    audio = PCMU.encode(np.arange(-1600, 1600, 2, dtype=np.int16))
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="big", stop=False)
    huge = json.dumps({"event": "mark", "mark": {"name": "x" * 5000}})
    code, _ = await send_raw(receiver, client_ssl, [*messages, huge])
    assert code == 1009
    await wait_idle(receiver)
    directory = recording(receiver, "big")
    samples, _ = read_wav(directory / "inbound.wav")
    np.testing.assert_array_equal(samples, PCMU.decode(audio))
    assert record_of(directory)["end"]["kind"] == "protocol-error"
    assert receiver.counters["protocol_errors", "frame"] == 1


async def test_invalid_utf8_text_frame_is_1007(
    receiver: Receiver, client_ssl: ssl.SSLContext
) -> None:
    """A text frame that is not UTF-8 is refused with 1007 by the WebSocket layer."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(url(receiver), ssl=client_ssl, additional_headers=headers) as ws:
        await ws.send(start_frame("utf8"))
        # bytes with text=True: a text frame carrying invalid UTF-8, as a broken client would.
        await ws.send(b"\xff\xfe{}", text=True)
        async with asyncio.timeout(10):
            await ws.wait_closed()
    assert ws.close_code == 1007
    await wait_idle(receiver)
    assert record_of(recording(receiver, "utf8"))["end"]["close_code"] == 1007


async def test_pings_are_answered_on_the_fast_frame_path(
    receiver: Receiver, client_ssl: ssl.SSLContext
) -> None:
    """Pings between media frames get their pongs while the receiver splits the frames itself,
    and the recording is sample-exact."""
    audio = PCMU.encode(np.arange(-8000, 8000, 2, dtype=np.int16))
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="pings")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(url(receiver), ssl=client_ssl, additional_headers=headers) as ws:
        for number, message in enumerate(messages):
            await ws.send(message)
            if number % 10 == 5:
                async with asyncio.timeout(10):
                    await (await ws.ping(f"ping {number}"))
        async with asyncio.timeout(10):
            await ws.wait_closed()
    assert ws.close_code == 1000
    await wait_idle(receiver)
    samples, _ = read_wav(recording(receiver, "pings") / "inbound.wav")
    np.testing.assert_array_equal(samples, PCMU.decode(audio))


async def test_frames_sent_with_the_handshake_are_recorded(
    receiver: Receiver, client_ssl: ssl.SSLContext
) -> None:
    """A client that sends its frames in the same write as its upgrade request (before the
    101): the bytes after the request's head go to the splitter, recorded sample-exact."""

    audio = PCMU.encode(np.arange(-4000, 4000, 2, dtype=np.int16))
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="eager")
    frames = b"".join(ws_frame(m.encode()) for m in messages)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", receiver.port, ssl=client_ssl, server_hostname="localhost"
    )
    writer.write(upgrade_request("/media", TOKEN) + frames)
    async with asyncio.timeout(10):
        answer = await reader.readuntil(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 101")
    await until(lambda: receiver.counters["streams_ended", "stop"] > 0)
    writer.close()
    await wait_idle(receiver)
    samples, _ = read_wav(recording(receiver, "eager") / "inbound.wav")
    np.testing.assert_array_equal(samples, PCMU.decode(audio))


async def test_idle_stream_is_closed_and_recorded(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """A stream that goes quiet past idle_timeout_s is closed with 1008, its audio kept."""
    receiver = await start_receiver(idle_timeout_s=0.3)
    audio = PCMU.encode(np.full(800, 1000, dtype=np.int16))
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="idle", stop=False)
    code, reason = await send_raw(receiver, client_ssl, messages)
    assert code == 1008
    assert "no message" in reason
    await wait_idle(receiver)
    directory = recording(receiver, "idle")
    assert len(read_wav(directory / "inbound.wav")[0]) == 800
    assert record_of(directory)["end"]["kind"] == "idle-timeout"


class BrokenSink:
    """A sink whose writes fail, to show that one failing sink harms no other."""

    def open(self, info: Any) -> None:
        pass

    def write(self, track: Any, position: int, samples: Any) -> None:
        raise OSError(28, "No space left on device")

    def event(self, record: Any) -> None:
        pass

    def close(self, summary: Any) -> None:
        pass


async def test_failing_sink_leaves_the_others_complete(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """A sink that fails is logged, counted and named in stream.json; wav and memory finish."""
    from receiver.sinks import MemorySink, WavSink

    memory: list[MemorySink] = []

    def memory_factory(settings: Any) -> MemorySink:
        memory.append(MemorySink())
        return memory[-1]

    factories = [
        ("broken", lambda settings: BrokenSink()),
        ("wav", WavSink.from_settings),
        ("memory", memory_factory),
    ]
    receiver = await start_receiver(sink_factories=factories)
    encoded = sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")
    expected = sox_decode(tmp_path / "in.ul", "ul")
    messages = build_messages(codec=PCMU, tracks={"inbound": encoded}, stream_sid="sinks")
    result = await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    assert result.close_code == 1000
    directory = recording(receiver, "sinks")
    np.testing.assert_array_equal(read_wav(directory / "inbound.wav")[0], expected)
    np.testing.assert_array_equal(memory[0].audio("inbound"), expected)
    assert memory[0].summary is not None and memory[0].summary.end.kind == "stop"
    errors = record_of(directory)["sink_errors"]
    assert len(errors) == 1 and "broken" in errors[0] and "No space left" in errors[0]
    assert receiver.counters["sink_errors", "broken"] == 1


async def test_connections_per_address_limit_answers_429(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """Past max_connections_per_ip from one address, the handshake gets HTTP 429."""
    receiver = await start_receiver(max_connections_per_ip=2)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        connect(url(receiver), ssl=client_ssl, additional_headers=headers),
        connect(url(receiver), ssl=client_ssl, additional_headers=headers),
    ):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url(receiver), ssl=client_ssl, additional_headers=headers):
                pass
    assert info.value.response.status_code == 429
    assert receiver.counters["handshake_rejections", "ip_limit"] == 1
    await wait_idle(receiver)
    assert not receiver.per_ip


async def test_tokens_never_reach_the_logs(
    receiver: Receiver, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither an accepted nor a rejected token appears in any log line or close reason."""
    caplog.set_level("DEBUG")
    wrong = "wrong-but-secret-0123456789"
    with pytest.raises(InvalidStatus):
        async with connect(
            url(receiver), ssl=client_ssl, additional_headers={"Authorization": f"Bearer {wrong}"}
        ):
            pass
    audio = PCMU.encode(np.zeros(800, dtype=np.int16))
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="quiet")
    await play(url(receiver), [*messages[:-1], "{bad"], token=TOKEN, ssl_context=client_ssl)
    await wait_idle(receiver)
    assert "rejected handshake" in caplog.text
    for secret in (TOKEN, OTHER_TOKEN, wrong):
        assert secret not in caplog.text
    assert TOKEN not in (recording(receiver, "quiet") / "stream.json").read_text()


async def test_metrics_move_during_a_stream(
    receiver: Receiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """/metrics (no token) shows a live stream's frames growing, then its end, and auth failures."""
    with pytest.raises(InvalidStatus):
        async with connect(url(receiver), ssl=client_ssl):
            pass
    encoded = sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")
    messages = build_messages(
        codec=PCMU, tracks={"inbound": encoded, "outbound": encoded}, stream_sid="metered"
    )
    live = asyncio.create_task(
        play(
            url(receiver),
            messages,
            token=TOKEN,
            ssl_context=client_ssl,
            pace=0.25,
        )
    )
    seen = []
    for _ in range(3):
        await asyncio.sleep(0.3)
        status, headers, body = await http_get(receiver.port, "/metrics", client_ssl)
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        seen.append(metric(body, "receiver_frames_total", codec="pcmu", track="inbound"))
        assert metric(body, "receiver_streams_active") == 1
    assert seen[0] < seen[1] < seen[2]
    await live
    _, _, body = await http_get(receiver.port, "/metrics", client_ssl)
    frames = len(encoded) // 160 + bool(len(encoded) % 160)
    assert metric(body, "receiver_frames_total", codec="pcmu", track="inbound") == frames
    assert metric(body, "receiver_frames_total", codec="pcmu", track="outbound") == frames
    assert metric(body, "receiver_audio_bytes_total", codec="pcmu", track="inbound") == len(encoded)
    assert metric(body, "receiver_streams_ended_total", end="stop") == 1
    assert metric(body, "receiver_handshake_rejections_total", reason="auth") == 1
    assert metric(body, "receiver_streams_active") == 0
    assert metric(body, "receiver_sink_write_seconds_count", sink="wav") > 0
    assert metric(body, "receiver_stream_duration_seconds_count") == 1


async def test_metrics_on_a_port_of_their_own(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """With metrics_port set, /metrics moves there (plain HTTP) and leaves the stream port."""
    receiver = await start_receiver(metrics_port=0)
    assert receiver.metrics_port
    status, _, body = await http_get(receiver.metrics_port, "/metrics", None)
    assert status == 200 and "receiver_streams_active 0.0" in body
    with pytest.raises(InvalidStatus) as info:
        async with connect(url(receiver, "/metrics"), ssl=client_ssl):
            pass
    assert info.value.response.status_code == 401


async def test_flac_and_stereo_options(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """file_format=flac records sample-exact FLAC; stereo adds inbound-left/outbound-right."""
    receiver = await start_receiver(file_format="flac", stereo=True)
    encoded = {t: sox_encode(speech[t].wav[8000], "ul", tmp_path / f"{t}.ul") for t in speech}
    expected = {t: sox_decode(tmp_path / f"{t}.ul", "ul") for t in speech}
    messages = build_messages(
        codec=PCMU, tracks=encoded, stream_sid="flac", drop={"outbound": set(range(10, 20))}
    )
    await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    directory = recording(receiver, "flac")
    import soundfile

    expected["outbound"][9 * 160 : 19 * 160] = 0
    for track in ("inbound", "outbound"):
        assert soundfile.info(str(directory / f"{track}.flac")).format == "FLAC"
        np.testing.assert_array_equal(read_wav(directory / f"{track}.flac")[0], expected[track])
    stereo, rate = soundfile.read(directory / "stereo.flac", dtype="int16")
    assert rate == 8000 and stereo.shape[1] == 2
    length = max(len(expected["inbound"]), len(expected["outbound"]))
    assert len(stereo) == length
    for channel, track in enumerate(("inbound", "outbound")):
        padded = np.zeros(length, dtype=np.int16)
        padded[: len(expected[track])] = expected[track]
        np.testing.assert_array_equal(stereo[:, channel], padded)
    assert record_of(directory)["files"] == {
        "inbound": "inbound.flac",
        "outbound": "outbound.flac",
        "stereo": "stereo.flac",
    }


async def test_max_stream_duration_closes_a_busy_stream(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """A stream still sending at max_stream_duration_s is closed with 1008, its audio kept."""
    receiver = await start_receiver(max_stream_duration_s=0.5, idle_timeout_s=5)
    audio = PCMU.encode(np.full(8000 * 3, 700, dtype=np.int16))
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="long")
    # Half real time: the wall clock reaches 0.5 s while the timestamps stand near 250 ms.
    result = await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl, pace=2.0)
    assert result.close_code == 1008
    assert "max stream duration" in (result.close_reason or "")
    directory = recording(receiver, "long")
    kept = len(read_wav(directory / "inbound.wav")[0])
    assert 0.15 * 8000 <= kept <= 0.45 * 8000
    assert record_of(directory)["end"]["kind"] == "max-duration"


class FailsOnClose(BrokenSink):
    """A sink that takes everything but fails to finish."""

    def write(self, track: Any, position: int, samples: Any) -> None:
        pass

    def close(self, summary: Any) -> None:
        raise RuntimeError("could not confirm the last batch")


async def test_sink_failing_at_close_is_named_in_stream_json(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """An error a sink raises while closing still reaches stream.json (wav closes last)."""
    from receiver.sinks import WavSink

    receiver = await start_receiver(
        sink_factories=[("wav", WavSink.from_settings), ("late", lambda s: FailsOnClose())]
    )
    audio = PCMU.encode(np.full(1600, 300, dtype=np.int16))
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="late")
    assert (
        await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    ).close_code == 1000
    errors = record_of(recording(receiver, "late"))["sink_errors"]
    assert errors == ["close: sink 'late' failed: RuntimeError: could not confirm the last batch"]


class FailsOnOpen(BrokenSink):
    """A sink that cannot even start (its storage is gone)."""

    def open(self, info: Any) -> None:
        raise OSError(13, "Permission denied")


@pytest.mark.parametrize("sink", [FailsOnOpen, BrokenSink])
async def test_stream_whose_only_sink_failed_ends_with_1011(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, sink: type[BrokenSink]
) -> None:
    """When no sink is left (failed at open, or at the last flush of a short stream), the stream
    closes with 1011 and the reason, not 1000 as if it had been recorded."""
    receiver = await start_receiver(sink_factories=[("only", lambda settings: sink())])
    audio = PCMU.encode(np.full(400, 300, dtype=np.int16))  # 50 ms: written only at the end
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="lost")
    result = await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    assert result.close_code == 1011
    assert "recording failed: " in (result.close_reason or "")
    await wait_idle(receiver)
    assert receiver.counters["recording_failures"] == 1
    assert receiver.counters["sink_errors", "only"] == 1
    assert await healthz(receiver, client_ssl) == 200


@pytest.mark.parametrize("stage", ["tcp", "tls"])
async def test_handshake_timeout_drops_silent_connections(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, stage: str
) -> None:
    """A client that connects and then says nothing (before TLS, or before the HTTP upgrade)
    is dropped after handshake_timeout_s; the server stays healthy."""
    receiver = await start_receiver(handshake_timeout_s=0.5)
    if stage == "tcp":
        reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
    else:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", receiver.port, ssl=client_ssl, server_hostname="localhost"
        )
    loop = asyncio.get_running_loop()
    opened = loop.time()
    async with asyncio.timeout(5):
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await reader.read() == b""
    assert 0.4 <= loop.time() - opened < 3
    writer.close()
    assert await healthz(receiver, client_ssl) == 200
    assert list_tree(receiver) == []
