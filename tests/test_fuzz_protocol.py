"""Fuzzing the parser: any text, bytes or JSON becomes an event or a ``ProtocolError``, each
mutated field of a platform message is refused and each good one parsed exactly, and the order
rules hold for any sequence (strategies in tests/support/strategies.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.events import (
    Start,
    Track,
)
from receiver.exceptions import (
    LimitExceeded,
    MalformedMessage,
    UnsupportedMedia,
)
from receiver.protocol import MAX_JSON_DEPTH, StreamProtocol
from tests.support.fuzzing import fuzz, receive
from tests.support.strategies import (
    KNOWN_EVENTS,
    LIMITS,
    WIRE_CHARS,
    Ctx,
    Msg,
    advance,
    json_scalars,
    json_values,
    message,
    protocol_for,
)

# ---------------------------------------------------------------------------------------------
# Parser properties


@given(st.text(WIRE_CHARS, max_size=200), st.sampled_from(["awaiting", "streaming", "stopped"]))
@fuzz
def test_any_text_gives_an_event_or_a_protocol_error(text: str, state: str) -> None:
    """Any text is an event or a ProtocolError with a close code and reason that can be sent."""
    receive(in_state(state), text)


# Regression (found by the fuzzing, fixed in d4d163f): msgspec encodes the text to UTF-8 first,
# so a lone surrogate raised UnicodeEncodeError out of receive().
@pytest.mark.parametrize("state", ["awaiting", "streaming"])
def test_lone_surrogates_are_a_protocol_error(state: str) -> None:
    """A str with a lone surrogate (no UTF-8 form) is a ProtocolError, like any other text."""
    for text in (
        "\ud800",
        '{"event": "media\udfff"}',
        '{"event": "mark", "mark": {"name": "\ud800"}}',
    ):
        receive(in_state(state), text)


@given(st.binary(max_size=200), st.sampled_from(["awaiting", "streaming", "stopped"]))
@fuzz
def test_any_bytes_are_refused_with_1003(data: bytes, state: str) -> None:
    """A binary message is always UnsupportedMedia (1003), in every state."""
    got = receive(in_state(state), data)
    assert isinstance(got, UnsupportedMedia)


event_shaped = st.fixed_dictionaries(
    {"event": st.sampled_from(KNOWN_EVENTS) | json_scalars},
    optional={
        "sequenceNumber": json_values,
        "streamSid": json_values,
        "rawEvent": json_values,
        "media": st.dictionaries(
            st.sampled_from(["track", "chunk", "timestamp", "payload"]), json_values
        )
        | json_values,
        "start": st.dictionaries(
            st.sampled_from(
                ["streamSid", "tracks", "mediaFormat", "customParameters", "accountSid", "callSid"]
            ),
            json_values,
        )
        | json_values,
        "dtmf": st.dictionaries(st.sampled_from(["digit", "duration", "track"]), json_values),
        "mark": st.dictionaries(st.sampled_from(["name"]), json_values) | json_values,
        "stop": json_values,
    },
)


@given(
    json_values | event_shaped | st.builds(lambda e: {"rawEvent": e}, event_shaped),
    st.sampled_from(["awaiting", "streaming", "stopped"]),
    st.booleans(),
)
@fuzz
def test_any_json_gives_an_event_or_a_protocol_error(value: Any, state: str, ascii: bool) -> None:
    """Any JSON value (known events with fields of any type too) is an event or a ProtocolError."""
    text = json.dumps(value, ensure_ascii=ascii)
    got = receive(in_state(state), text)
    if not isinstance(value, dict):
        assert isinstance(got, MalformedMessage)


@given(message("clean"), st.data())
@fuzz
def test_platform_text_mutated_gives_an_event_or_a_protocol_error(msg: Msg, data: Any) -> None:
    """A platform message cut, spliced or with characters changed still never crashes the parser."""
    text = msg.text()
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        how = data.draw(st.sampled_from(["cut", "insert", "replace", "repeat", "truncate"]))
        end = min(len(text), at + data.draw(st.integers(0, 8)))
        if how == "cut":
            text = text[:at] + text[end:]
        elif how == "insert":
            piece = data.draw(
                st.sampled_from(['"', "{", "}", "[", "]", ",", ":", "\\", "-", "1e9", "null"])
                | st.text(WIRE_CHARS, max_size=40)
            )
            text = text[:at] + piece + text[at:]
        elif how == "replace":
            text = text[:at] + data.draw(st.text(WIRE_CHARS, min_size=1, max_size=2)) + text[end:]
        elif how == "repeat":
            text = text[:end] + text[at:end] + text[end:]
        else:
            text = text[:at]
    state = data.draw(st.sampled_from(["awaiting", "streaming", "stopped"]))
    receive(in_state(state), text)


def in_state(state: str) -> StreamProtocol:
    """A protocol awaiting start, streaming a single-track start, or stopped."""
    protocol = StreamProtocol()
    if state != "awaiting":
        start = {
            "event": "start",
            "start": {
                "streamSid": "fuzz",
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
            },
        }
        protocol.receive(json.dumps(start))
    if state == "stopped":
        protocol.receive('{"event": "stop"}')
    return protocol


@given(
    message("many"),
    st.sampled_from(["awaiting", "streaming", "streaming-single", "stopped"]),
    LIMITS,
    st.booleans(),
)
@fuzz
def test_each_mutated_field_is_refused_and_each_good_one_parsed_exactly(
    msg: Msg, state: str, limits: tuple[int, int], ascii_json: bool
) -> None:
    """Numbers as strings/ints/floats, bad ones, wrong types, bad base64: the oracle's verdict."""
    protocol, ctx = protocol_for(limits)
    # Bring the protocol (and the oracle) to the state, with a start of one or two tracks.
    if state != "awaiting":
        tracks = ["outbound_track"] if state == "streaming-single" else ["inbound", "outbound"]
        start = {
            "event": "start",
            "start": {
                "streamSid": "s",
                "tracks": tracks,
                "mediaFormat": {"encoding": "audio/x-L16", "sampleRate": 16000},
            },
        }
        assert isinstance(protocol.receive(json.dumps(start)), Start)
        single: Track | None = "outbound" if state == "streaming-single" else None
        ctx = replace(ctx, state="streaming", default_track=single)
    if state == "stopped":
        protocol.receive('{"event": "stop"}')
        ctx = replace(ctx, state="stopped")
    advance(protocol, ctx, msg, ascii_json=ascii_json)


@given(st.lists(message("one"), max_size=12), LIMITS, st.booleans())
@fuzz
def test_message_sequences_follow_the_order_rules(
    msgs: list[Msg], limits: tuple[int, int], ascii_json: bool
) -> None:
    """Messages in any order: each an event in order, the oracle's error out of it."""
    protocol, ctx = protocol_for(limits)
    state: Ctx | None = ctx
    for msg in msgs:
        state = advance(protocol, state, msg, ascii_json=ascii_json)
        if state is None:  # the server closes the stream at the first ProtocolError
            break


@given(st.data())
@fuzz
def test_custom_parameter_limits_are_exact(data: Any) -> None:
    """At most max_custom_parameters parameters of max_parameter_chars: one more is 1008."""
    max_params = data.draw(st.integers(0, 8))
    max_chars = data.draw(st.integers(16, 100))
    count = data.draw(st.integers(0, max_params + 2))
    near = st.integers(max(0, max_chars - 2), max_chars + 2)
    params = {}
    for i in range(count):
        key = data.draw(st.sampled_from([f"k{i}", f"k{i}".ljust(data.draw(near), "k")]))
        params[key] = "v" * data.draw(near | st.integers(0, 3))
    start = {
        "event": "start",
        "start": {
            "streamSid": "limits",
            "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
        },
    }
    protocol = StreamProtocol(max_custom_parameters=max_params, max_parameter_chars=max_chars)
    got = receive(protocol, json.dumps(start))
    too_big = any(max(len(k), len(v)) > max_chars for k, v in params.items())
    if len(params) > max_params or too_big:
        assert isinstance(got, LimitExceeded), got
    else:
        assert isinstance(got, Start) and got.custom_parameters == params


# Deep nesting: a bound on JSON nesting must make it a parse error (1007), never a crash.
NESTING_CASES = {
    "start.customParameters": '{"event":"start","start":{"streamSid":"s","customParameters":'
    '{"k":%s},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000}}}',
    "start.mediaFormat.sampleRate": '{"event":"start","start":{"streamSid":"s",'
    '"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":%s}}}',
    "start.unknown": '{"event":"start","start":{"streamSid":"s","x":%s,'
    '"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000}}}',
    "media.track": '{"event":"media","media":{"track":%s,"payload":""}}',
    "media.chunk": '{"event":"media","media":{"track":"inbound","chunk":%s,"payload":""}}',
    "sequenceNumber": '{"event":"mark","sequenceNumber":%s,"mark":{"name":"x"}}',
    "dtmf.duration": '{"event":"dtmf","dtmf":{"digit":"1","duration":%s}}',
    "mark.unknown": '{"event":"mark","x":%s,"mark":{"name":"m"}}',
    "stop.stop": '{"event":"stop","stop":%s}',
    "event": '{"event":%s}',
    "rawEvent": '{"rawEvent":%s}',
}
# Regressions (found by the fuzzing, fixed in d4d163f): with orjson, nesting up to 1024 levels
# parsed and then repr() of it in a close reason raised RecursionError; with msgspec, nesting in
# a field the fast media decoder skips (dtmf.duration, mark.unknown while streaming) did.
# Nested inside a message the parser reads while streaming (media and dtmf are only valid then).
_STREAMING_PLACES = ("media.", "dtmf.", "mark.")


@pytest.mark.parametrize("place", list(NESTING_CASES))
def test_deeply_nested_values_are_an_event_or_a_protocol_error(place: str) -> None:
    """Arrays nested 900 to 1100 deep anywhere in a message: an event or a ProtocolError."""
    for depth in (900, 1000, 1010, 1020, 1023, 1024, 1100):
        text = NESTING_CASES[place] % ("[" * depth + "]" * depth)
        streaming = place.startswith(_STREAMING_PLACES)
        protocol = in_state("streaming") if streaming else StreamProtocol()
        receive(protocol, text)


# ---------------------------------------------------------------------------------------------
# Found from the nesting cases above, end to end (fixed): the parser refused nesting only near
# Python's recursion limit, while stream.json is written with json.dumps, one recursion level a
# nesting level, from a deeper stack. For about ten depths just under the parser's limit
# (941-983) the start was accepted and the wav sink failed in open() or close() with
# RecursionError, and the stream still ended with 1000. Now the parser refuses JSON nested
# deeper than MAX_JSON_DEPTH, and a stream left without a sink ends with 1011.
async def test_deeply_nested_start_is_recorded_or_refused(start_receiver: Any) -> None:
    """A start nested up to MAX_JSON_DEPTH is recorded whole (1000); deeper ones, up to past
    the old crash band, are refused (1007) and write nothing."""
    from websockets.asyncio.client import connect

    from tests.support.receiver import TOKEN

    # Plain ws (the handshakes are the cost): the nesting is what matters, not the TLS.
    receiver = await start_receiver(tls_on=False)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    media = json.dumps({"event": "media", "media": {"track": "inbound", "payload": "AAAA"}})

    async def send(depth: int) -> tuple[int | None, str | None]:
        nested = "[" * depth + "]" * depth
        start = (
            f'{{"event":"start","start":{{"streamSid":"deep{depth}","x":{nested},'
            '"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000}}}'
        )
        url = f"ws://127.0.0.1:{receiver.port}/deep"
        async with connect(url, additional_headers=headers) as ws:
            for frame in (start, media, '{"event": "stop"}'):
                await ws.send(frame)
            await ws.wait_closed()
        record = receiver.settings.recordings_dir / f"deep{depth}" / "stream.json"
        status = json.loads(record.read_text())["status"] if record.exists() else None
        return ws.close_code, status

    # Nesting inside the start's extra value: two levels for the message and its start.
    for depth in (1, 2, MAX_JSON_DEPTH - 2):
        assert await send(depth) == (1000, "complete"), depth
    for depth in (MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, *range(880, 1031, 5)):
        assert await send(depth) == (1007, None), depth
    assert receiver.counters["sink_errors"] == 0
    assert receiver.counters["internal_errors"] == 0
