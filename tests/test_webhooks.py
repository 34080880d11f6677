"""Signed webhooks (Standard Webhooks) to an HTTP server the test runs, verified with the
``standardwebhooks`` library: an implementation that is not ours."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from receiver.codecs import CLI_CODECS, codec_for
from receiver.delivery import Delivery
from receiver.delivery.signing import parse_secret
from receiver.simulate import build_messages, play
from receiver.sinks import MemorySink, WavSink
from tests.support.audio import sox_encode
from tests.support.delivery_servers import WEBHOOK_SECRET, WebhookServer
from tests.support.receiver import TOKEN, StartReceiver, url, wait_idle

PCMU = codec_for(CLI_CODECS["pcmu"])


@pytest.fixture
def hooks() -> Any:
    server = WebhookServer([500, 500])
    yield server
    server.stop()


async def test_events_are_signed_and_a_500_twice_gets_the_same_id_a_third_time(
    start_receiver: StartReceiver,
    client_ssl: ssl.SSLContext,
    speech: Any,
    tmp_path: Path,
    hooks: WebhookServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """stream.started and stream.ended arrive signed; each, refused twice with 500, comes a
    third time with the same webhook-id; the secret and the URL's query are in no log line."""
    caplog.set_level(logging.DEBUG)
    delivery = Delivery()
    receiver = await start_receiver(
        sink_factories=[("wav", WavSink.from_settings), ("delivery", delivery)],
        webhook_url=hooks.url,
        webhook_secret=WEBHOOK_SECRET,
        delivery_retry_first_s=0.1,
        delivery_retry_max_s=0.5,
    )
    encoded = {t: sox_encode(speech[t].wav[8000], "ul", tmp_path / f"{t}.ul") for t in speech}
    messages = build_messages(
        codec=PCMU, tracks=encoded, stream_sid="hooked", custom_parameters={"agent": "42"}
    )
    result = await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
    assert result.close_code == 1000
    await wait_idle(receiver)
    await hooks.wait_for(2)
    await asyncio.wait_for(delivery.wait_delivered(), 30)

    verifier = Webhook(WEBHOOK_SECRET)

    def msg_id(headers: dict[str, str]) -> str:
        return {k.lower(): v for k, v in headers.items()}["webhook-id"]

    events = []
    for headers, body in hooks.accepted():
        events.append(verifier.verify(body, {k.lower(): v for k, v in headers.items()}))
    # Each event: 500, 500, then 200, all three with one id (and one body).
    ids = [msg_id(h) for h, _, _ in hooks.received]
    assert sorted(set(ids)) == sorted(msg_id(h) for h, _ in hooks.accepted())
    for each in set(ids):
        tries = [(status, body) for h, body, status in hooks.received if msg_id(h) == each]
        assert [status for status, _ in tries] == [500, 500, 200], (each, tries)
        assert len({body for _, body in tries}) == 1
        assert each.startswith("msg_")
    by_type = {e["type"]: e["data"] for e in events}
    assert set(by_type) == {"stream.started", "stream.ended"}
    assert by_type["stream.started"]["custom_parameters"] == {"agent": "42"}
    ended = by_type["stream.ended"]
    assert ended["stream_sid"] == "hooked" and ended["end"]["kind"] == "stop"
    assert ended["tracks"]["inbound"]["samples"] > 0 and "gaps" in ended["tracks"]["inbound"]
    assert ended["files"] == {"inbound": "inbound.wav", "outbound": "outbound.wav"}
    # A tampered body fails verification: the check is real.
    headers, body = hooks.accepted()[0]
    with pytest.raises(Exception, match=r"(?i)signature"):
        verifier.verify(
            body.replace(b"hooked", b"hacked"), {k.lower(): v for k, v in headers.items()}
        )
    metrics = receiver.metrics.render()
    assert 'receiver_webhook_failures_total{reason="http_500"} 4.0' in metrics
    assert "receiver_webhooks_delivered_total 2.0" in metrics
    key_text = WEBHOOK_SECRET.removeprefix("whsec_")
    assert all(
        key_text not in r.getMessage() and "t0ken" not in r.getMessage() for r in caplog.records
    )
    assert any("http_500" in r.getMessage() for r in caplog.records)
    json.dumps(by_type)  # plain JSON all through


def test_a_malformed_secret_is_refused_without_quoting_it() -> None:
    """The settings check names the problem, never the value."""
    with pytest.raises(ValueError, match="whsec_") as caught:
        parse_secret("whsec_not base64!!")
    assert "not base64" not in str(caught.value)


async def test_without_a_record_sink_stream_ended_still_says_which_stream_and_how_it_ended(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, speech: Any, tmp_path: Path
) -> None:
    """No wav sink (so no stream.json): the event is built from what the stream told."""
    hooks = WebhookServer()
    try:
        delivery = Delivery()
        receiver = await start_receiver(
            sink_factories=[("memory", lambda settings: MemorySink()), ("delivery", delivery)],
            webhook_url=hooks.url,
            webhook_secret=WEBHOOK_SECRET,
        )
        encoded = {"inbound": sox_encode(speech["inbound"].wav[8000], "ul", tmp_path / "in.ul")}
        messages = build_messages(codec=PCMU, tracks=encoded, stream_sid="no-files")
        result = await play(url(receiver), messages, token=TOKEN, ssl_context=client_ssl)
        assert result.close_code == 1000
        await wait_idle(receiver)
        await hooks.wait_for(2)
    finally:
        hooks.stop()
    verifier = Webhook(WEBHOOK_SECRET)
    events = {}
    for headers, body in hooks.accepted():
        event = verifier.verify(body, {k.lower(): v for k, v in headers.items()})
        events[event["type"]] = event["data"]
    ended = events["stream.ended"]
    assert ended["stream_sid"] == "no-files" and ended["directory"] is None
    assert ended["end"]["kind"] == "stop" and ended["tracks"]["inbound"]["samples"] > 0


def test_backoff_forgets_items_that_left_the_queue() -> None:
    """An item that failed and then left the queue another way (`receiver upload`) must not
    keep a due time: the worker would wake at once, pass after pass."""
    from receiver.delivery.queue import Backoff

    backoff = Backoff(first_s=0.001, max_s=0.001)
    backoff.failed("gone.json")
    backoff.failed("kept.json")
    backoff.retain({"kept.json"})
    assert set(backoff.not_before) == {"kept.json"} and set(backoff.attempts) == {"kept.json"}
    backoff.retain(set())
    assert backoff.next_due_s() is None
