"""The sans-I/O parser: strings in, typed events or ProtocolErrors out."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from receiver.events import Connected, Dtmf, Mark, Media, Start, Stop, UnknownEvent
from receiver.exceptions import (
    LimitExceeded,
    MalformedMessage,
    ProtocolError,
    UnexpectedMessage,
    UnsupportedMedia,
)
from receiver.protocol import State, StreamProtocol

SIGNALWIRE_START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "streamSid": "7d56cc11-0000",
        "accountSid": "b08dacad-0000",
        "callSid": "76ac3c36-0000",
        "tracks": ["inbound", "outbound"],
        "customParameters": {"FirstName": "Jane", "room": "42"},
        "mediaFormat": {"encoding": "audio/x-L16", "sampleRate": 24000, "channels": 1},
        "futureField": {"kept": True},
    },
}
TWILIO_START = {
    "event": "start",
    "sequenceNumber": "1",
    "streamSid": "MZ0123",
    "start": {
        "accountSid": "AC0123",
        "callSid": "CA0123",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
}


def started(start: dict[str, Any] = SIGNALWIRE_START) -> StreamProtocol:
    protocol = StreamProtocol()
    protocol.receive(json.dumps({"event": "connected", "protocol": "Call", "version": "0.2.0"}))
    protocol.receive(json.dumps(start))
    return protocol


def media(**fields: Any) -> str:
    body = {
        "track": "inbound",
        "chunk": "1",
        "timestamp": "0",
        "payload": base64.b64encode(b"\xff" * 160).decode(),
    }
    body.update(fields)
    return json.dumps({"event": "media", "sequenceNumber": "2", "media": body})


def test_signalwire_start_is_parsed_with_unknown_fields_kept() -> None:
    """SignalWire's start gives ids, tracks, format, parameters; unknown fields stay in raw."""
    protocol = StreamProtocol()
    event = protocol.receive(json.dumps(SIGNALWIRE_START))
    assert isinstance(event, Start)
    assert event.stream_sid == "7d56cc11-0000"
    assert event.media_format.encoding == "audio/x-L16"
    assert event.media_format.sample_rate_hz == 24000
    assert event.tracks == ("inbound", "outbound")
    assert event.custom_parameters == {"FirstName": "Jane", "room": "42"}
    assert event.raw["futureField"] == {"kept": True}
    assert event.sequence_number == 1
    assert protocol.state is State.STREAMING


def test_twilio_start_takes_top_level_stream_sid() -> None:
    """Twilio's top-level streamSid is used when start has none; parameters default empty."""
    event = StreamProtocol().receive(json.dumps(TWILIO_START))
    assert isinstance(event, Start)
    assert event.stream_sid == "MZ0123"
    assert event.custom_parameters == {}


def test_connected_version_is_not_validated() -> None:
    """Any connected version is accepted."""
    event = StreamProtocol().receive('{"event": "connected", "protocol": "Call", "version": "9"}')
    assert event == Connected(protocol="Call", version="9")


@pytest.mark.parametrize("value", ["20", 20, 20.0])
def test_numbers_as_strings_or_json_numbers(value: Any) -> None:
    """chunk and timestamp are accepted as digit strings and as JSON numbers."""
    event = started().receive(media(chunk=value, timestamp=value))
    assert isinstance(event, Media)
    assert (event.chunk, event.timestamp_ms) == (20, 20)
    assert event.payload == b"\xff" * 160


@pytest.mark.parametrize("value", ["-1", -1, "1e3", "", " 1", "٣", True, 1.5, [], "9" * 16])
def test_bad_numbers_are_malformed(value: Any) -> None:
    """Negative, fractional, non-digit, boolean and absurdly long numbers are refused (1007)."""
    with pytest.raises(MalformedMessage) as info:
        started().receive(media(timestamp=value))
    assert info.value.close_code == 1007
    assert "timestamp" in info.value.reason


def test_media_fields_are_optional_but_payload_is_not() -> None:
    """chunk and timestamp may be absent; payload may not."""
    event = started().receive(
        json.dumps({"event": "media", "media": {"track": "outbound", "payload": ""}})
    )
    assert event == Media(track="outbound", payload=b"")
    with pytest.raises(MalformedMessage):
        started().receive(json.dumps({"event": "media", "media": {"track": "inbound"}}))


def test_single_track_stream_may_omit_track() -> None:
    """With one track announced in start, media without a track belongs to it."""
    protocol = started(TWILIO_START)
    event = protocol.receive(json.dumps({"event": "media", "media": {"payload": "AA=="}}))
    assert isinstance(event, Media) and event.track == "inbound"
    with pytest.raises(MalformedMessage):
        started().receive(json.dumps({"event": "media", "media": {"payload": "AA=="}}))


@pytest.mark.parametrize("payload", ["!!!!", "AAA", "AA=A", "A===", "AAAA\n"])
def test_bad_base64_is_malformed(payload: str) -> None:
    """Payloads that are not strict base64 are refused with 1007."""
    with pytest.raises(MalformedMessage, match="base64"):
        started().receive(media(payload=payload))


def test_signalwire_and_twilio_dtmf() -> None:
    """Both DTMF layouts parse; Twilio's inbound_track is normalised."""
    protocol = started()
    sw = protocol.receive(
        '{"event": "dtmf", "sequenceNumber": "3", "dtmf": {"digit": "5", "duration": 2000}}'
    )
    tw = protocol.receive('{"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "#"}}')
    assert sw == Dtmf(digit="5", duration_ms=2000, sequence_number=3)
    assert tw == Dtmf(digit="#", track="inbound")


def test_mark_stop_and_unknown_events() -> None:
    """Marks, Twilio's stop body and unknown events parse; stop ends the stream."""
    protocol = started()
    assert protocol.receive('{"event": "mark", "mark": {"name": "m1"}}') == Mark(name="m1")
    assert protocol.receive('{"event": "sparkle"}') == UnknownEvent(name="sparkle")
    stop = protocol.receive('{"event": "stop", "sequenceNumber": "9", "stop": {"callSid": "C"}}')
    assert stop == Stop(sequence_number=9, raw={"callSid": "C"})
    assert protocol.state is State.STOPPED


def test_unknown_event_names_are_cut_to_max_name_chars() -> None:
    """An unknown event's name is kept up to max_name_chars, before and after start."""
    protocol = StreamProtocol(max_name_chars=10)
    assert protocol.receive(json.dumps({"event": "z" * 5000})) == UnknownEvent(name="z" * 10)
    protocol.receive(json.dumps(SIGNALWIRE_START))
    assert protocol.receive(json.dumps({"event": "sparkle"})) == UnknownEvent(name="sparkle")
    assert StreamProtocol().receive(json.dumps({"event": "y" * 300})) == UnknownEvent("y" * 256)


def test_raw_event_envelope_is_unwrapped() -> None:
    """The rawEvent logging envelope of an older docs page is unwrapped."""
    wrapped = {
        "timestamp": "x",
        "direction": "in",
        "eventType": "start",
        "rawEvent": SIGNALWIRE_START,
    }
    assert isinstance(StreamProtocol().receive(json.dumps(wrapped)), Start)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([media()], UnexpectedMessage),
        (['{"event": "dtmf", "dtmf": {"digit": "1"}}'], UnexpectedMessage),
        ([json.dumps(SIGNALWIRE_START), json.dumps(SIGNALWIRE_START)], UnexpectedMessage),
        ([json.dumps(SIGNALWIRE_START), '{"event": "stop"}', media()], UnexpectedMessage),
        (["{"], MalformedMessage),
        (["[]"], MalformedMessage),
        (['{"event": 5}'], MalformedMessage),
        (['{"event": "start", "start": {"streamSid": "s"}}'], MalformedMessage),
        (['{"event": "start", "start": {"mediaFormat": {}}}'], MalformedMessage),
        (["[" * 100_000], MalformedMessage),
        (["1" * 10_000], MalformedMessage),
        ([b"binary"], UnsupportedMedia),
    ],
    ids=[
        "media-first",
        "dtmf-first",
        "second-start",
        "after-stop",
        "json",
        "array",
        "event-type",
        "no-format",
        "no-sid",
        "deep-nesting",
        "huge-int",
        "binary",
    ],
)
def test_order_and_shape_errors(messages: list[str | bytes], error: type[ProtocolError]) -> None:
    """Out-of-order and malformed messages raise the fitting ProtocolError, nothing else."""
    protocol = StreamProtocol()
    with pytest.raises(error) as info:
        for message in messages:
            protocol.receive(message)
    assert info.value.close_code in (1003, 1007, 1008)
    assert len(info.value.close_reason.encode()) <= 123


def test_too_many_custom_parameters_is_a_limit() -> None:
    """More than 99 custom parameters is refused (1008)."""
    start = json.loads(json.dumps(SIGNALWIRE_START))
    start["start"]["customParameters"] = {f"p{i}": "v" for i in range(100)}
    with pytest.raises(LimitExceeded):
        StreamProtocol().receive(json.dumps(start))


def test_close_reason_is_cut_on_a_character_boundary() -> None:
    """A long unicode reason fits a close frame and stays valid UTF-8."""
    error = MalformedMessage("é" * 200)
    assert len(error.close_reason.encode("utf-8")) <= 123
    assert error.close_reason.endswith("...")


def test_oversized_custom_parameter_is_a_limit() -> None:
    """A custom parameter value over max_parameter_chars is refused (1008)."""
    start = json.loads(json.dumps(SIGNALWIRE_START))
    start["start"]["customParameters"] = {"blob": "x" * 5000}
    with pytest.raises(LimitExceeded, match="4096"):
        StreamProtocol().receive(json.dumps(start))
    assert isinstance(StreamProtocol(max_parameter_chars=5000).receive(json.dumps(start)), Start)


@pytest.mark.parametrize(
    "wrap", [lambda inner: [inner], lambda inner: {"k": inner}], ids=["arrays", "objects"]
)
def test_json_nesting_is_bounded(wrap: Any) -> None:
    """A start nested MAX_JSON_DEPTH levels parses and is kept verbatim; one more is 1007."""
    from receiver.protocol import MAX_JSON_DEPTH

    def start_with_extra(levels: int) -> str:
        start = json.loads(json.dumps(SIGNALWIRE_START))
        value: Any = "leaf"
        for _ in range(levels - 2):  # the message and its start are two levels
            value = wrap(value)
        start["start"]["extra"] = value
        return json.dumps(start)

    event = StreamProtocol().receive(start_with_extra(MAX_JSON_DEPTH))
    assert isinstance(event, Start) and "extra" in event.raw
    with pytest.raises(MalformedMessage, match=f"deeper than {MAX_JSON_DEPTH}"):
        StreamProtocol().receive(start_with_extra(MAX_JSON_DEPTH + 1))
