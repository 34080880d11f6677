"""The platform's status callbacks: signatures checked by Twilio's own validator's scheme (the
`twilio` package signs the form requests; the JSON scheme is computed here, apart from ours),
events joined to the real WavSink's stream.json before, during and after the stream, the
errors of streams that never arrived, and every bound."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
from twilio.request_validator import RequestValidator

from receiver.codecs import codec_for
from receiver.delivery.service import event_data
from receiver.events import MediaFormat, Start
from receiver.exceptions import ConfigError
from receiver.http import HttpRequest
from receiver.metrics import Count, Counters, ReceiverMetrics
from receiver.server import Receiver
from receiver.session import TrackStats
from receiver.settings import load_settings
from receiver.sinks import StreamInfo, WavSink
from receiver.sinks.base import StreamEnd, StreamSummary
from receiver.status import (
    ERROR_HINTS,
    ERRORS_LOG_NAME,
    StatusCallbacks,
    error_label,
    signed_url_forms,
)
from tests.support.clients import Target, good_stream
from tests.support.receiver import TOKEN, wait_idle
from tests.support.wire import SERVER_NAME

KEY = "PSK_test_signing_key_0123456789"
OLD_KEY = "PSK_rotated_out_key_9876543210"
HOST = "receiver.example.com"
PATH = "/signalwire/status"
URL = f"https://{HOST}{PATH}"
CONFERENCE = "CF7d56cc11aa"
CALL = "76ac3c36-0000-4000-8000-000000000002"
PEER = "203.0.113.5"


def callback(sid: str = "MZ1", event: str = "stream-started", **extra: str) -> dict[str, str]:
    """The fields SignalWire documents for a conference stream's status callback."""
    fields = {
        "AccountSid": "b08dacad-0000-4000-8000-000000000001",
        "CallSid": CALL,
        "ConferenceSid": CONFERENCE,
        "StreamSid": sid,
        "StreamName": "room-42",
        "StreamEvent": event,
        "StreamTrack": "both_tracks",
        "Timestamp": "2026-12-02T06:00:00.000Z",
    }
    fields.update(extra)
    return fields


def form_request(
    params: dict[str, str],
    *,
    key: str = KEY,
    signed_url: str = URL,
    header: str = "x-signalwire-signature",
    host: str = HOST,
    target: str = PATH,
    tls: bool = True,
    body: bytes | None = None,
) -> HttpRequest:
    """A form POST signed by twilio's RequestValidator over ``signed_url``."""
    signature = RequestValidator(key).compute_signature(signed_url, params)
    headers = [("host", host), ("content-type", "application/x-www-form-urlencoded")]
    if header:
        headers.append((header, signature))
    return HttpRequest(
        "POST",
        target,
        tuple(headers),
        urlencode(params).encode() if body is None else body,
        peer_ip=PEER,
        tls=tls,
    )


def get_request(params: dict[str, str], *, key: str = KEY) -> HttpRequest:
    """A GET (StatusCallbackMethod=GET): the fields in the query, signed with the URL alone."""
    target = f"{PATH}?{urlencode(params)}"
    signature = RequestValidator(key).compute_signature(f"https://{HOST}{target}", {})
    headers = (("host", HOST), ("x-signalwire-signature", signature))
    return HttpRequest("GET", target, headers, peer_ip=PEER)


def json_request(params: dict[str, str], *, key: str = KEY, tamper: bool = False) -> HttpRequest:
    """A JSON body signed hex(HMAC-SHA1(key, URL + body)), computed here."""
    body = json.dumps(params).encode()
    signature = hmac.new(key.encode(), URL.encode() + body, hashlib.sha1).hexdigest()
    if tamper:
        body = body.replace(b"room-42", b"room-43")
    headers = (
        ("host", HOST),
        ("content-type", "application/json"),
        ("x-signalwire-signature", signature),
    )
    return HttpRequest("POST", PATH, headers, body, peer_ip=PEER)


def json_form_request(params: dict[str, str]) -> HttpRequest:
    """A JSON body signed with the form scheme over its fields (the compatibility SDK's
    fallback for JSON bodies), by twilio's RequestValidator."""
    signature = RequestValidator(KEY).compute_signature(URL, params)
    headers = (
        ("host", HOST),
        ("content-type", "application/json; charset=utf-8"),
        ("x-signalwire-signature", signature),
    )
    return HttpRequest("POST", PATH, headers, json.dumps(params).encode(), peer_ip=PEER)


def body_hash_request(params: dict[str, str]) -> HttpRequest:
    """A JSON body under the form scheme with ``bodySHA256`` in the URL (Twilio's JSON scheme)."""
    body = json.dumps(params).encode()
    target = f"{PATH}?bodySHA256={hashlib.sha256(body).hexdigest()}"
    signature = RequestValidator(KEY).compute_signature(f"https://{HOST}{target}", {})
    headers = (
        ("host", HOST),
        ("content-type", "application/json"),
        ("x-twilio-signature", signature),
    )
    return HttpRequest("POST", target, headers, body, peer_ip=PEER)


@pytest.fixture
def recordings(tmp_path: Path) -> Path:
    path = tmp_path / "recordings"
    path.mkdir()
    return path


@pytest.fixture
def make_callbacks(recordings: Path) -> Callable[..., StatusCallbacks]:
    def make(**overrides: Any) -> StatusCallbacks:
        values: dict[str, Any] = {
            "signing_keys": [KEY, OLD_KEY],
            "recordings_dir": recordings,
            "counters": Counters(),
        }
        values.update(overrides)
        return StatusCallbacks(**values)

    return make


@pytest.fixture
def callbacks(make_callbacks: Callable[..., StatusCallbacks]) -> StatusCallbacks:
    return make_callbacks()


def stream_info(sid: str) -> StreamInfo:
    media_format = MediaFormat("audio/x-mulaw", 8000)
    return StreamInfo(
        start=Start(
            stream_sid=sid, media_format=media_format, tracks=("inbound",), raw={"streamSid": sid}
        ),
        path="/media",
        query="",
        remote="127.0.0.1",
        started_at=datetime.now(UTC),
        codec=codec_for(media_format),
    )


class Recording:
    """One stream recorded by the real WavSink, with the calls the shell makes around it."""

    def __init__(self, callbacks: StatusCallbacks, recordings: Path, sid: str) -> None:
        self.callbacks, self.sid = callbacks, sid
        self.sink = WavSink(recordings_dir=recordings)
        callbacks.stream_started(sid)
        self.sink.open(stream_info(sid))
        self.sink.write("inbound", 0, np.full(1600, 1000, dtype=np.int16))

    async def end(self, *, before_finish: HttpRequest | None = None) -> Path:
        """The shell's end: the summary takes the platform fields, the sinks close, then the
        files are reported finished (``before_finish`` comes in between, like a late call)."""
        summary = StreamSummary(
            end=StreamEnd("stop"),
            ended_at=datetime.now(UTC),
            sample_rate_hz=8000,
            tracks={"inbound": TrackStats(samples=1600)},
            platform=self.callbacks.platform_fields(self.sid),
        )
        await self.sink.aclose(summary)
        if before_finish is not None:
            assert (await self.callbacks.handle(before_finish)).status == 200
        assert self.sink.directory is not None
        await self.callbacks.stream_finished(self.sid, self.sink.directory)
        return self.sink.directory


def record(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "stream.json").read_text())


def events_of(data: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    return [(e["event"], e["error"]) for e in data["platform_events"]]


# ---------------------------------------------------------------------------------------------
# Joined to the recording.


async def test_callbacks_before_during_and_after_the_stream_reach_its_stream_json(
    callbacks: StatusCallbacks, recordings: Path
) -> None:
    """Signed callbacks before the stream connects and while it runs are held for its summary;
    one after its files are finished rewrites stream.json whole, keeping everything else."""
    before = await callbacks.handle(form_request(callback(event="stream-started")))
    assert before.status == 200
    recording = Recording(callbacks, recordings, "MZ1")
    during = callback(
        event="stream-error", StreamError="general_error", Timestamp="2026-12-02T06:00:01Z"
    )
    assert (await callbacks.handle(form_request(during))).status == 200
    directory = await recording.end()

    data = record(directory)
    assert data["status"] == "complete" and data["tracks"]["inbound"]["samples"] == 1600
    assert data["conference_sid"] == CONFERENCE
    assert data["stream_name"] == "room-42"
    assert data["platform_call_sid"] == CALL
    assert events_of(data) == [("stream-started", None), ("stream-error", "general_error")]
    assert data["platform_events"][0]["timestamp"] == "2026-12-02T06:00:00.000Z"
    assert data["platform_events"][0]["track"] == "both_tracks"
    # A connected stream's error is not one of a stream that never arrived.
    assert not (recordings / ERRORS_LOG_NAME).exists()

    after = callback(event="stream-stopped", Timestamp="2026-12-02T06:10:00Z")
    assert (await callbacks.handle(form_request(after))).status == 200
    updated = record(directory)
    assert events_of(updated)[-1] == ("stream-stopped", None)
    assert {k: v for k, v in updated.items() if k != "platform_events"} == {
        k: v for k, v in data.items() if k != "platform_events"
    }
    assert not list(directory.glob("*.tmp"))
    assert callbacks.counters[Count.STATUS_CALLBACKS, "stored"] == 3


async def test_a_callback_between_the_summary_and_the_finished_files_is_not_lost(
    callbacks: StatusCallbacks, recordings: Path
) -> None:
    """A callback that comes while the sinks close (after platform_fields) is written into
    stream.json when the shell reports the files finished."""
    recording = Recording(callbacks, recordings, "MZ2")
    late = form_request(callback("MZ2", event="stream-stopped"))
    directory = await recording.end(before_finish=late)
    assert events_of(record(directory)) == [("stream-stopped", None)]


def test_the_summary_carries_the_platform_fields_without_replacing_its_own() -> None:
    """StreamSummary.platform is merged into as_dict (so the redis end message and webhooks
    carry it too), and never replaces a key of the stream's own."""
    summary = StreamSummary(
        end=StreamEnd("stop"),
        ended_at=datetime.now(UTC),
        sample_rate_hz=8000,
        platform={"conference_sid": CONFERENCE, "messages": "not this"},
    )
    data = summary.as_dict()
    assert data["conference_sid"] == CONFERENCE and data["messages"] == 0


async def test_webhooks_carry_the_platform_fields(
    callbacks: StatusCallbacks, recordings: Path
) -> None:
    """stream.ended's data, made from the stream's record, carries the platform fields."""
    assert (await callbacks.handle(form_request(callback("MZ-hook")))).status == 200
    directory = await Recording(callbacks, recordings, "MZ-hook").end()
    data = event_data(record(directory))
    assert data["conference_sid"] == CONFERENCE and data["stream_name"] == "room-42"
    assert data["platform_call_sid"] == CALL
    assert events_of(data) == [("stream-started", None)]


async def test_platform_fields_of_a_stream_the_platform_said_nothing_of(
    callbacks: StatusCallbacks, make_callbacks: Callable[..., StatusCallbacks]
) -> None:
    """With a signing key every stream's record has the four keys, empty when no callback
    came; without one it gains nothing, and streams leave no entries behind."""
    callbacks.stream_started("MZ-silent")
    assert callbacks.platform_fields("MZ-silent") == {
        "conference_sid": None,
        "stream_name": None,
        "platform_call_sid": None,
        "platform_events": [],
    }
    off = make_callbacks(signing_keys=[])
    off.stream_started("MZ-off")
    assert off.platform_fields("MZ-off") == {} and len(off.events) == 0


async def test_a_late_callback_for_a_deleted_recording_is_answered_200(
    callbacks: StatusCallbacks, recordings: Path
) -> None:
    """After an upload deleted the local copy, a late callback cannot update stream.json: it
    is answered 200 (a retry would not help) and nothing is recreated."""
    recording = Recording(callbacks, recordings, "MZ-gone")
    directory = await recording.end()
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    late = form_request(callback("MZ-gone", event="stream-stopped"))
    assert (await callbacks.handle(late)).status == 200
    assert not directory.exists()


# ---------------------------------------------------------------------------------------------
# Signatures.


@pytest.mark.parametrize(
    "request_for",
    [
        pytest.param(lambda p: form_request(p), id="form"),
        pytest.param(lambda p: form_request(p, header="x-twilio-signature"), id="twilio-header"),
        pytest.param(lambda p: form_request(p, key=OLD_KEY), id="second-key"),
        pytest.param(lambda p: get_request(p), id="get-query"),
        pytest.param(lambda p: json_request(p), id="json-hex"),
        pytest.param(lambda p: body_hash_request(p), id="json-bodySHA256"),
        pytest.param(lambda p: json_form_request(p), id="json-form-scheme"),
        pytest.param(
            lambda p: form_request(p, signed_url=f"https://{HOST}:443{PATH}"), id="signed-with-443"
        ),
        pytest.param(
            lambda p: form_request(p, host=f"{HOST}:443"), id="host-with-443-signed-without"
        ),
        pytest.param(
            lambda p: form_request(
                p, signed_url=f"http://{HOST}:8080{PATH}", host=f"{HOST}:8080", tls=False
            ),
            id="plain-http-other-port",
        ),
    ],
)
async def test_signed_callbacks_are_accepted(
    callbacks: StatusCallbacks, request_for: Callable[[dict[str, str]], HttpRequest]
) -> None:
    """Each signing scheme, either header, either key, either port form: 200 and kept."""
    response = await callbacks.handle(request_for(callback("MZ-ok")))
    assert response.status == 200
    fields = callbacks.platform_fields("MZ-ok")
    assert fields["conference_sid"] == CONFERENCE
    assert events_of(fields) == [("stream-started", None)]


@pytest.mark.parametrize(
    ("url", "forms"),
    [
        (URL, (URL, f"https://{HOST}:443{PATH}")),
        (f"https://{HOST}:443{PATH}", (f"https://{HOST}:443{PATH}", URL)),
        ("http://h/x?a=1", ("http://h/x?a=1", "http://h:80/x?a=1")),
        ("https://[::1]:8443/x", ("https://[::1]:8443/x", "https://[::1]/x")),
        ("https://h:99999/x", ("https://h:99999/x",)),
    ],
)
def test_the_url_forms_a_signature_is_checked_against(url: str, forms: tuple[str, ...]) -> None:
    """The URL as rebuilt, with the default port, without a port (IPv6 kept whole)."""
    assert signed_url_forms(url) == forms


async def test_the_public_url_is_what_was_signed(
    make_callbacks: Callable[..., StatusCallbacks],
) -> None:
    """Behind a proxy or tunnel, RECEIVER_PUBLIC_URL (path prefix included) is the URL that was
    signed, whatever Host the request carries; the Host-based URL no longer passes."""
    callbacks = make_callbacks(public_url="https://public.example.net/rec/")
    signed = "https://public.example.net/rec" + PATH
    ok = form_request(callback("MZ-pub"), signed_url=signed, host="127.0.0.1:8443")
    assert (await callbacks.handle(ok)).status == 200
    by_host = form_request(callback("MZ-host"), host=HOST)
    assert (await callbacks.handle(by_host)).status == 403
    assert "MZ-pub" in callbacks.events and "MZ-host" not in callbacks.events


def _tampered() -> HttpRequest:
    request = form_request(callback("MZ-bad"))
    body = request.body.replace(b"room-42", b"room-43")
    return HttpRequest(request.method, request.target, request.headers, body, peer_ip=PEER)


@pytest.mark.parametrize(
    ("request_for", "outcome"),
    [
        pytest.param(
            lambda: form_request(callback("MZ-bad"), key="PSK_not_our_key_000000"),
            "bad_signature",
            id="wrong-key",
        ),
        pytest.param(_tampered, "bad_signature", id="tampered-field"),
        pytest.param(
            lambda: form_request(callback("MZ-bad"), header=""), "no_signature", id="no-header"
        ),
        pytest.param(
            lambda: form_request(callback("MZ-bad"), signed_url=f"https://{HOST}/other"),
            "bad_signature",
            id="wrong-path",
        ),
        pytest.param(
            lambda: form_request(callback("MZ-bad"), signed_url=f"https://evil.example{PATH}"),
            "bad_signature",
            id="wrong-host",
        ),
        pytest.param(
            lambda: form_request(callback("MZ-bad"), signed_url=f"http://{HOST}{PATH}"),
            "bad_signature",
            id="wrong-scheme",
        ),
        pytest.param(
            lambda: json_request(callback("MZ-bad"), tamper=True),
            "bad_signature",
            id="json-tampered",
        ),
    ],
)
async def test_unsigned_or_missigned_callbacks_are_refused_and_store_nothing(
    callbacks: StatusCallbacks,
    recordings: Path,
    request_for: Callable[[], HttpRequest],
    outcome: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Wrong key, tampered field, no header, another URL: 403, counted, one log line for a
    burst of them, nothing kept (in memory or on disk)."""
    caplog.set_level(logging.WARNING, "receiver.status")
    for _ in range(3):
        response = await callbacks.handle(request_for())
        assert response.status == 403
    assert callbacks.counters[Count.STATUS_CALLBACKS, outcome] == 3
    assert "MZ-bad" not in callbacks.events and len(callbacks.events) == 0
    assert list(recordings.iterdir()) == []
    lines = [r for r in caplog.records if "refused (403)" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert KEY not in caplog.text and OLD_KEY not in caplog.text


async def test_without_a_signing_key_the_endpoint_answers_404(
    make_callbacks: Callable[..., StatusCallbacks], caplog: pytest.LogCaptureFixture
) -> None:
    """No RECEIVER_SIGNALWIRE_SIGNING_KEY: 404 (as for any path nothing serves), counted,
    and one warning that names the setting."""
    callbacks = make_callbacks(signing_keys=[])
    assert not callbacks.enabled
    for _ in range(2):
        assert (await callbacks.handle(form_request(callback()))).status == 404
    assert callbacks.counters[Count.STATUS_CALLBACKS, "not_configured"] == 2
    assert len(callbacks.events) == 0
    warnings = [r for r in caplog.records if "RECEIVER_SIGNALWIRE_SIGNING_KEY" in r.getMessage()]
    assert len(warnings) == 1


async def test_a_replayed_event_is_stored_once(
    callbacks: StatusCallbacks, recordings: Path
) -> None:
    """The same callback twice (the platform retries; an attacker replays): kept once, counted
    once as a stream error; a different Timestamp is another event."""
    error = callback("MZ-r", event="stream-error", StreamError="connection_refused")
    for _ in range(3):
        assert (await callbacks.handle(form_request(error))).status == 200
    assert len(callbacks.platform_fields("MZ-r")["platform_events"]) == 1
    assert callbacks.counters[Count.STATUS_CALLBACKS, "duplicate"] == 2
    assert callbacks.counters[Count.PLATFORM_STREAM_ERRORS, "connection_refused"] == 1
    assert len((recordings / ERRORS_LOG_NAME).read_text().splitlines()) == 1
    again = dict(error, Timestamp="2026-12-02T06:00:05Z")
    assert (await callbacks.handle(form_request(again))).status == 200
    assert len(callbacks.platform_fields("MZ-r")["platform_events"]) == 2


# ---------------------------------------------------------------------------------------------
# Streams that never arrived.


async def test_a_stream_error_for_a_stream_that_never_connected_is_warned_counted_and_kept(
    callbacks: StatusCallbacks, recordings: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The platform could not reach us: a WARNING with the hint, the counter in /metrics, and
    the event in recordings/platform-errors.jsonl."""
    caplog.set_level(logging.WARNING, "receiver.status")
    error = callback(
        "MZ-never", event="stream-error", StreamError="connection_refused_timeout_or_ssl_error"
    )
    assert (await callbacks.handle(form_request(error))).status == 200

    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert "never reached this receiver" in message and CONFERENCE in message
    assert "MZ-never" in message
    assert (
        "the platform could not complete TLS with this receiver: is its certificate publicly "
        "trusted, and is the port open?"
    ) in message
    metrics = ReceiverMetrics(
        counters=callbacks.counters, active_streams=lambda: 0, live_streams=lambda: []
    ).render()
    assert (
        'receiver_platform_stream_errors_total{error="connection_refused_timeout_or_ssl_error"} 1.0'
        in metrics
    )
    assert 'receiver_status_callbacks_total{outcome="stored"} 1.0' in metrics
    (line,) = (recordings / ERRORS_LOG_NAME).read_text().splitlines()
    kept = json.loads(line)
    assert kept["stream_sid"] == "MZ-never" and kept["conference_sid"] == CONFERENCE
    assert kept["error"] == "connection_refused_timeout_or_ssl_error"
    assert kept["hint"].startswith("the platform could not complete TLS")


async def test_a_burst_of_stream_errors_is_one_warning_and_every_one_kept(
    callbacks: StatusCallbacks, recordings: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage fails many streams at once: one WARNING per error kind (the next says how
    many were left out), every one counted and in the errors file."""
    caplog.set_level(logging.WARNING, "receiver.status")
    for n in range(5):
        params = callback(f"MZ-o{n}", event="stream-error", StreamError="connection_refused")
        assert (await callbacks.handle(form_request(params))).status == 200
    other = callback("MZ-c", event="stream-error", StreamError="codec_error")
    assert (await callbacks.handle(form_request(other))).status == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "codec_error" in warnings[1]
    assert callbacks.counters[Count.PLATFORM_STREAM_ERRORS, "connection_refused"] == 5
    assert len((recordings / ERRORS_LOG_NAME).read_text().splitlines()) == 6


@pytest.mark.parametrize(
    ("error", "label"),
    [
        ("connection_refused", "connection_refused"),
        ("Duplicated stream name", "duplicated_stream_name"),
        ("Duplicated stream ID", "duplicated_stream_id"),
        ("codec_error", "codec_error"),
        ("a new error nobody documented", "other"),
        ("other", "other"),
        ("", "unspecified"),
    ],
)
def test_stream_error_labels_are_bounded(error: str, label: str) -> None:
    """The counter's label is a documented error or "other": a client cannot grow it."""
    assert error_label(error) == label and label in ERROR_HINTS


async def test_a_hostile_stream_sid_never_reaches_a_path(
    callbacks: StatusCallbacks, recordings: Path
) -> None:
    """Ids are data: a sid of ../ and NUL is kept in the one errors file, nowhere else."""
    sid = "../../etc/passwd\x00\n"
    error = callback(sid, event="stream-error", StreamError="connection_refused")
    assert (await callbacks.handle(form_request(error))).status == 200
    assert [p.name for p in recordings.iterdir()] == [ERRORS_LOG_NAME]
    assert json.loads((recordings / ERRORS_LOG_NAME).read_text())["stream_sid"] == sid


async def test_a_failed_write_answers_500_and_the_retry_stores_it(
    make_callbacks: Callable[..., StatusCallbacks], tmp_path: Path
) -> None:
    """When the errors file cannot be written the platform is told (500) and its retry is not
    taken for a replay."""
    missing = tmp_path / "not-yet"
    callbacks = make_callbacks(recordings_dir=missing)
    error = form_request(callback("MZ-w", event="stream-error", StreamError="connection_refused"))
    assert (await callbacks.handle(error)).status == 500
    assert callbacks.counters[Count.STATUS_CALLBACKS, "write_failed"] == 1
    assert callbacks.counters[Count.PLATFORM_STREAM_ERRORS] == 0
    missing.mkdir()
    assert (await callbacks.handle(error)).status == 200
    assert (missing / ERRORS_LOG_NAME).exists()
    assert callbacks.counters[Count.PLATFORM_STREAM_ERRORS, "connection_refused"] == 1


# ---------------------------------------------------------------------------------------------
# Bounds: each with its limit and its counter.


async def test_streams_held_are_bounded_and_live_ones_are_never_evicted(
    make_callbacks: Callable[..., StatusCallbacks],
) -> None:
    """Past max_streams the least recently touched entry goes (counted); when every entry is
    a live stream, a new stream's callback is not kept (counted) but answered 200."""
    callbacks = make_callbacks(max_streams=3)
    for n in range(4):
        assert (await callbacks.handle(form_request(callback(f"MZ{n}")))).status == 200
    assert "MZ0" not in callbacks.events and len(callbacks.events) == 3
    assert callbacks.counters[Count.PLATFORM_EVENTS_DROPPED, "streams"] == 1

    full = make_callbacks(max_streams=2)
    full.stream_started("live-1")
    full.stream_started("live-2")
    assert (await full.handle(form_request(callback("MZ-new")))).status == 200
    assert "MZ-new" not in full.events and {"live-1", "live-2"} <= set(full.events._streams)
    assert full.counters[Count.PLATFORM_EVENTS_DROPPED, "streams"] == 1
    assert full.counters[Count.STATUS_CALLBACKS, "dropped"] == 1


async def test_events_per_stream_are_bounded(
    make_callbacks: Callable[..., StatusCallbacks],
) -> None:
    """A stream keeps at most max_events_per_stream distinct events; the rest are counted."""
    callbacks = make_callbacks(max_events_per_stream=2)
    for n in range(4):
        params = callback("MZ-e", Timestamp=f"2026-12-02T06:00:0{n}Z")
        assert (await callbacks.handle(form_request(params))).status == 200
    assert len(callbacks.platform_fields("MZ-e")["platform_events"]) == 2
    assert callbacks.counters[Count.PLATFORM_EVENTS_DROPPED, "events"] == 2


async def test_field_lengths_are_bounded(make_callbacks: Callable[..., StatusCallbacks]) -> None:
    """Every kept value is cut to max_field_chars, each cut counted."""
    callbacks = make_callbacks(max_field_chars=40)  # a sid is 36: the other fields stay whole
    params = callback("MZ-f", ConferenceSid="C" * 1000, StreamName="n" * 41)
    assert (await callbacks.handle(form_request(params))).status == 200
    fields = callbacks.platform_fields("MZ-f")
    assert fields["conference_sid"] == "C" * 40 and fields["stream_name"] == "n" * 40
    assert fields["platform_call_sid"] == CALL
    assert callbacks.counters[Count.PLATFORM_EVENTS_DROPPED, "field_chars"] == 2


async def test_entries_expire_after_retain_s(
    make_callbacks: Callable[..., StatusCallbacks],
) -> None:
    """An entry untouched for retain_s is forgotten (on the next callback: no timer)."""
    now = [1000.0]
    callbacks = make_callbacks(retain_s=60.0, clock=lambda: now[0])
    callbacks.stream_started("live")
    assert (await callbacks.handle(form_request(callback("MZ-old")))).status == 200
    now[0] += 61
    assert (await callbacks.handle(form_request(callback("MZ-new")))).status == 200
    assert "MZ-old" not in callbacks.events and "live" in callbacks.events


async def test_the_errors_file_is_bounded(
    make_callbacks: Callable[..., StatusCallbacks], recordings: Path
) -> None:
    """platform-errors.jsonl is moved aside to .1 when full; the older .1 is dropped, counted."""
    callbacks = make_callbacks(max_errors_log_bytes=1200)
    for n in range(12):
        params = callback(f"MZ-x{n}", event="stream-error", StreamError="connection_refused")
        assert (await callbacks.handle(form_request(params))).status == 200
    files = sorted(p.name for p in recordings.iterdir())
    assert files == ["platform-errors.1.jsonl", ERRORS_LOG_NAME]
    assert all((recordings / f).stat().st_size <= 1200 for f in files)
    assert callbacks.counters[Count.PLATFORM_EVENTS_DROPPED, "error_log"] >= 1
    last = (recordings / ERRORS_LOG_NAME).read_text().splitlines()[-1]
    assert json.loads(last)["stream_sid"] == "MZ-x11"


async def test_the_body_is_bounded_and_must_be_a_callback(callbacks: StatusCallbacks) -> None:
    """The route reads at most 64 KiB; a form of hundreds of fields, a body that is neither
    a form nor a JSON object, or a signed callback without StreamSid: 400, counted."""
    route = callbacks.route()
    assert route.max_body_bytes == 64 * 1024 and route.methods == {"GET", "POST"}
    many = {f"F{n}": "x" for n in range(100)}
    assert (await callbacks.handle(form_request(many))).status == 400
    headers = (("host", HOST), ("content-type", "text/xml"), ("x-signalwire-signature", "x"))
    xml = HttpRequest("POST", PATH, headers, b"<x/>")
    assert (await callbacks.handle(xml)).status == 400
    no_sid = {k: v for k, v in callback().items() if k != "StreamSid"}
    assert (await callbacks.handle(form_request(no_sid))).status == 400
    assert callbacks.counters[Count.STATUS_CALLBACKS, "bad_request"] == 2
    assert callbacks.counters[Count.STATUS_CALLBACKS, "no_stream_sid"] == 1
    assert len(callbacks.events) == 0


# ---------------------------------------------------------------------------------------------
# Settings.


def test_signing_keys_public_url_and_status_path_settings() -> None:
    """Keys are comma-separated (rotation); the public URL must be http(s) with a host; a bad
    key is named by its variable, never echoed."""
    settings = load_settings(
        signalwire_signing_key=f"{KEY}, {OLD_KEY}", public_url="https://rec.example.com/"
    )
    assert settings.signing_key_values == [KEY, OLD_KEY]
    assert settings.status_callback_url == "https://rec.example.com/signalwire/status"
    assert load_settings().status_callback_url is None
    with pytest.raises(ConfigError) as short:
        load_settings(signalwire_signing_key="PSK_short")
    assert short.value.variable == "RECEIVER_SIGNALWIRE_SIGNING_KEY"
    assert "PSK_short" not in str(short.value)
    for bad in ("ftp://rec.example.com", "https://rec.example.com/?x=1", "rec.example.com"):
        with pytest.raises(ConfigError, match="RECEIVER_PUBLIC_URL"):
            load_settings(public_url=bad)
    with pytest.raises(ConfigError, match="RECEIVER_STATUS_PATH"):
        load_settings(status_path="/a?b")
    callbacks = StatusCallbacks.from_settings(settings, counters=Counters())
    assert callbacks.enabled and callbacks.public_url == "https://rec.example.com"
    assert KEY not in repr(callbacks)


# ---------------------------------------------------------------------------------------------
# End to end over the real TLS port (needs the stream port's router, issue 13).


async def test_status_callbacks_over_the_tls_port(
    start_receiver: Callable[..., Any], client_ssl: ssl.SSLContext, recordings: Path
) -> None:
    """Over real TLS to RECEIVER_STATUS_PATH: a signed callback before a real stream and one
    after it land in its stream.json; an unsigned one is 403; a stream-error for a stream
    that never came is counted and lands in the errors file."""
    receiver: Receiver = await start_receiver(recordings_dir=recordings, signalwire_signing_key=KEY)
    url = f"https://{SERVER_NAME}:{receiver.port}{PATH}"

    async def post(client: httpx.AsyncClient, params: dict[str, str], key: str = KEY) -> int:
        signature = RequestValidator(key).compute_signature(url, params)
        response = await client.post(
            url, data=params, headers={"X-SignalWire-Signature": signature}
        )
        return response.status_code

    async with httpx.AsyncClient(verify=client_ssl) as client:
        assert await post(client, callback("MZe2e", event="stream-started")) == 200
        target = Target(receiver.port, client_ssl, TOKEN, 10.0, 60.0)
        await good_stream(target, "MZe2e", frames=10)
        await wait_idle(receiver)
        directory = recordings / "MZe2e"
        assert record(directory)["conference_sid"] == CONFERENCE
        assert await post(client, callback("MZe2e", event="stream-stopped")) == 200
        assert events_of(record(directory)) == [("stream-started", None), ("stream-stopped", None)]

        assert await post(client, callback("MZe2e-bad"), key="PSK_not_our_key_000000") == 403
        never = callback(
            "MZe2e-never",
            event="stream-error",
            StreamError="connection_refused_timeout_or_ssl_error",
        )
        assert await post(client, never) == 200
    assert "MZe2e-never" in (recordings / ERRORS_LOG_NAME).read_text()
    label = "connection_refused_timeout_or_ssl_error"
    assert receiver.counters[Count.PLATFORM_STREAM_ERRORS, label] == 1
    assert receiver.counters[Count.STATUS_CALLBACKS, "bad_signature"] == 1
