"""Hypothesis strategies for the fuzz properties: platform-shaped messages with the judge that
says what the parser must make of each, media formats, a stream's frames lost, duplicated,
late and hostile, and WebSocket client frames right and wrong."""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from hypothesis import strategies as st
from numpy.typing import NDArray
from websockets.frames import Frame, Opcode

from receiver.codecs import (
    encode_l16,
)
from receiver.events import (
    Connected,
    Dtmf,
    Mark,
    Media,
    MediaFormat,
    Start,
    Stop,
    StreamSid,
    Track,
    UnknownEvent,
)
from receiver.exceptions import (
    LimitExceeded,
    MalformedMessage,
    ProtocolError,
    UnexpectedMessage,
)
from receiver.protocol import StreamProtocol
from tests.support.fuzzing import receive

# ---------------------------------------------------------------------------------------------
# Generators of platform-shaped messages, each with a judge that says what the parser must make
# of it (the oracle), given the protocol's state.

# Text frames reach the parser as valid UTF-8 (websockets checks it), so no lone surrogates;
# test_lone_surrogates_are_a_protocol_error holds the parser to its contract for those too.
WIRE_CHARS = st.characters(exclude_categories=("Cs",))
wire_text = st.text(WIRE_CHARS, max_size=24)

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(WIRE_CHARS, max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(wire_text, inner, max_size=4),
    max_leaves=12,
)
# Values that survive a JSON round trip unchanged (kept verbatim by the parser: start.raw, stop).
faithful_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(WIRE_CHARS, max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(wire_text, inner, max_size=4),
    max_leaves=12,
)


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


MISSING = _Sentinel("MISSING")  # the field is left out of the message
BAD = _Sentinel("BAD")  # the parser must refuse the message with 1007
DEFAULT = _Sentinel("DEFAULT")  # media.track absent: the single track of start, if any

TRACK_NAMES: dict[str, Track] = {
    "inbound": "inbound",
    "outbound": "outbound",
    "inbound_track": "inbound",
    "outbound_track": "outbound",
}
KNOWN_EVENTS = ("connected", "start", "media", "dtmf", "mark", "stop")
Pair = tuple[Any, Any]  # (what goes on the wire, what the parser must make of it)


def put(obj: dict[str, Any], key: str, wire: Any) -> None:
    if wire is not MISSING:
        obj[key] = wire


@functools.cache  # strategies are built once, drawn from many times
def ints_in_range() -> st.SearchStrategy[int]:
    return st.integers(0, 100) | st.integers(0, 10**15 - 1) | st.sampled_from([8000, 10**15 - 1])


@functools.cache  # strategies are built once, drawn from many times
def number_valid(*, optional: bool = True) -> st.SearchStrategy[Pair]:
    """Whole numbers >= 0 of at most 15 digits, as JSON numbers or strings of digits."""
    forms = [
        st.builds(lambda n: (n, n), ints_in_range()),
        st.builds(lambda n: (str(n), n), ints_in_range()),
        st.builds(lambda n, z: ("0" * z + str(n), n), st.integers(0, 99_999), st.integers(1, 9)),
        st.builds(lambda n: (float(n), n), st.integers(0, 10**15 - 1)),
    ]
    if optional:
        forms += [st.just((None, None)), st.just((MISSING, None))]
    return st.one_of(forms)


BAD_DIGIT_STRINGS = [
    "",
    " 1",
    "1 ",
    "+1",
    "-1",
    "1.0",
    "1e3",
    "0x1f",
    "1_000",
    "NaN",
    "Infinity",
    "\u0661\u0662",  # Arabic-Indic digits: isdigit() but not ASCII
    "\u00b2",  # superscript two: isdigit() but int() refuses it
    "\uff11",  # fullwidth one
    "1" * 16,
]


@functools.cache  # strategies are built once, drawn from many times
def number_invalid() -> st.SearchStrategy[Pair]:
    """Negative, fractional, too long, not a number at all."""
    return st.one_of(
        st.builds(lambda n: (n, BAD), st.integers(max_value=-1)),
        st.builds(lambda n: (str(n), BAD), st.integers(max_value=-1)),
        st.builds(lambda n: (n, BAD), st.integers(min_value=10**15)),
        st.builds(lambda n: (str(n), BAD), st.integers(min_value=10**15)),
        st.builds(
            lambda f: (f, BAD),
            st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
        ),
        st.builds(lambda f: (f, BAD), st.sampled_from([-1.0, 1e15, 1e300, -1e300])),
        st.builds(lambda b: (b, BAD), st.booleans()),
        st.builds(lambda s: (s, BAD), st.sampled_from(BAD_DIGIT_STRINGS)),
        st.builds(
            lambda s: (s, BAD),
            wire_text.filter(lambda s: not (s.isascii() and s.isdigit() and len(s) <= 15)),
        ),
        st.builds(lambda v: (v, BAD), st.lists(json_scalars, max_size=2)),
        st.builds(lambda v: (v, BAD), st.dictionaries(wire_text, json_scalars, max_size=2)),
    )


@functools.cache  # strategies are built once, drawn from many times
def text_valid(*, optional: bool, allow_empty: bool) -> st.SearchStrategy[Pair]:
    strings = wire_text if allow_empty else wire_text.filter(bool)
    forms = [st.builds(lambda s: (s, s), strings)]
    if optional:
        forms += [st.just((None, None)), st.just((MISSING, None))]
    return st.one_of(forms)


@functools.cache  # strategies are built once, drawn from many times
def text_invalid(*, optional: bool, allow_empty: bool) -> st.SearchStrategy[Pair]:
    forms = [
        st.builds(lambda v: (v, BAD), st.integers() | st.booleans() | st.floats(allow_nan=False)),
        st.builds(lambda v: (v, BAD), st.lists(json_scalars, max_size=2)),
        st.builds(lambda v: (v, BAD), st.dictionaries(wire_text, json_scalars, max_size=2)),
    ]
    if not optional:
        forms += [st.just((None, BAD)), st.just((MISSING, BAD))]
    if not allow_empty:
        forms.append(st.just(("", BAD)))
    return st.one_of(forms)


@functools.cache  # strategies are built once, drawn from many times
def payload_valid() -> st.SearchStrategy[Pair]:
    return st.builds(lambda b: (base64.b64encode(b).decode("ascii"), b), st.binary(max_size=64))


@st.composite
def payload_invalid(draw: st.DrawFn) -> Pair:
    """Base64 that strict decoding must refuse, or no string at all."""
    good = base64.b64encode(draw(st.binary(max_size=48))).decode("ascii")
    how = draw(st.sampled_from(["insert", "unpad", "extra", "lead", "after", "type"]))
    if how == "insert" or (how in {"unpad", "lead", "after"} and not good):
        at = draw(st.integers(0, len(good)))
        char = draw(st.sampled_from([" ", "!", "\n", "\t", "-", "_", ".", "*", "\u00e9", "\xa0"]))
        return good[:at] + char + good[at:], BAD
    if how == "unpad" and good.endswith("="):
        return good.rstrip("="), BAD
    if how in {"unpad", "extra"}:
        return good + draw(st.sampled_from("AQZaz09+/")), BAD
    if how == "lead":
        return "=" + good, BAD
    if how == "after" and good.endswith("="):
        return good + "QUJD", BAD
    if how == "after":
        return good + "=A", BAD
    return draw(st.sampled_from([None, MISSING, 5, [], {}, True])), BAD


@functools.cache  # strategies are built once, drawn from many times
def track_valid() -> st.SearchStrategy[Pair]:
    return st.sampled_from(
        [(name, track) for name, track in TRACK_NAMES.items()]
        + [(MISSING, DEFAULT), (None, DEFAULT)]
    )


@functools.cache  # strategies are built once, drawn from many times
def track_invalid() -> st.SearchStrategy[Pair]:
    names = st.sampled_from(["both", "INBOUND", "", "in", "outbound ", "inbound_tracks"])
    return st.builds(
        lambda v: (v, BAD),
        names
        | wire_text.filter(lambda s: s not in TRACK_NAMES)
        | st.integers()
        | st.lists(json_scalars, max_size=2),
    )


@functools.cache  # strategies are built once, drawn from many times
def extras() -> st.SearchStrategy[dict[str, Any]]:
    """Unknown fields, as the platform adds them; never a known name."""
    keys = st.text(WIRE_CHARS, max_size=8).map(lambda k: "x-" + k)
    return st.dictionaries(keys, faithful_values, max_size=2)


@dataclass(frozen=True)
class Ctx:
    """The protocol's state as the oracle models it."""

    state: str = "awaiting"  # awaiting | streaming | stopped
    default_track: Track | None = None
    max_parameters: int = 99
    max_parameter_chars: int = 4096


Outcome = tuple[Any, Ctx]  # an event, or a ProtocolError class; and the state after it


@dataclass(frozen=True)
class Msg:
    """A generated message and the judge that says what the parser must make of it."""

    obj: Any
    judge: Callable[[Ctx], Outcome]
    kind: str
    either_malformed: bool = False  # nested envelopes: the inner event, or 1007

    def text(self, ensure_ascii: bool = False) -> str:
        return json.dumps(self.obj, ensure_ascii=ensure_ascii)


def pick_bad(draw: st.DrawFn, fields: list[str], mode: str) -> set[str]:
    """Which fields of a message to corrupt: none, at most one, or any."""
    if mode == "clean":
        return set()
    if mode == "one":
        if draw(st.integers(0, 7)):
            return set()
        return {draw(st.sampled_from(fields))}
    if draw(st.booleans()):  # half the messages clean, so that the valid paths get their share
        return set()
    return draw(st.sets(st.sampled_from(fields)))


def one(draw: st.DrawFn, name: str, bad: set[str], good: Any, wrong: Any) -> Pair:
    pair: Pair = draw(wrong if name in bad else good)
    return pair


def one_text(
    draw: st.DrawFn, name: str, bad: set[str], *, optional: bool, allow_empty: bool
) -> Pair:
    """``one`` for a text field: a valid string, or (when ``name`` is bad) an invalid value."""
    return one(
        draw,
        name,
        bad,
        text_valid(optional=optional, allow_empty=allow_empty),
        text_invalid(optional=optional, allow_empty=allow_empty),
    )


def any_bad(*pairs: Pair) -> bool:
    return any(value is BAD for _, value in pairs)


@st.composite
def media_msg(draw: st.DrawFn, mode: str) -> Msg:
    bad = pick_bad(draw, ["seq", "body", "payload", "track", "chunk", "timestamp"], mode)
    seq = one(draw, "seq", bad, number_valid(), number_invalid())
    payload = one(draw, "payload", bad, payload_valid(), payload_invalid())
    track = one(draw, "track", bad, track_valid(), track_invalid())
    chunk = one(draw, "chunk", bad, number_valid(), number_invalid())
    ts = one(draw, "timestamp", bad, number_valid(), number_invalid())
    body: dict[str, Any] = draw(extras())
    put(body, "payload", payload[0])
    put(body, "track", track[0])
    put(body, "chunk", chunk[0])
    put(body, "timestamp", ts[0])
    obj: dict[str, Any] = {"event": "media", **draw(extras())}
    put(obj, "sequenceNumber", seq[0])
    if draw(st.booleans()):
        obj["streamSid"] = draw(wire_text)  # Twilio's top-level streamSid: ignored
    body_bad = "body" in bad
    obj["media"] = draw(st.sampled_from([None, [], "media", 0])) if body_bad else body

    def judge(ctx: Ctx) -> Outcome:
        if body_bad or any_bad(seq, payload, track, chunk, ts):
            return MalformedMessage, ctx
        which = ctx.default_track if track[1] is DEFAULT else track[1]
        if which is None:
            return MalformedMessage, ctx
        if ctx.state != "streaming":
            return UnexpectedMessage, ctx
        return Media(which, payload[1], chunk[1], ts[1], seq[1]), ctx

    return Msg(obj, judge, "media")


START_TRACKS_OK = st.lists(
    st.sampled_from([*TRACK_NAMES, "both_tracks"]) | wire_text, max_size=3
).map(lambda ts: (ts, tuple(ts))) | st.just((MISSING, ()))
START_TRACKS_BAD = st.builds(
    lambda v: (v, BAD), st.just(None) | st.integers() | wire_text
) | st.builds(lambda ts: ([*ts, 5], BAD), st.lists(wire_text, max_size=2))
# Parameter values whose size is plain: strings, or values with a short repr.
PARAM_VALUES = (
    st.text(WIRE_CHARS, max_size=80)
    | st.none()
    | st.booleans()
    | st.integers(-999, 999)
    | st.lists(st.integers(0, 9), max_size=2)
)
PARAMS_OK = (
    st.builds(
        lambda d: (d, d),
        st.dictionaries(st.text(WIRE_CHARS, max_size=80), PARAM_VALUES, max_size=6),
    )
    | st.just((None, {}))
    | st.just((MISSING, {}))
)
PARAMS_BAD = st.builds(
    lambda v: (v, BAD), st.lists(json_scalars, max_size=2) | wire_text | st.integers()
)
NON_EMPTY_TEXT = wire_text.filter(bool)
ENCODING_OK = st.builds(
    lambda s: (s, s.strip()),
    st.sampled_from(["audio/x-mulaw", "audio/x-L16", " audio/x-alaw ", "audio/G722"])
    | NON_EMPTY_TEXT,
)
RATE_OK = number_valid(optional=False).filter(lambda p: p[1] > 0)
RATE_BAD = number_invalid() | st.sampled_from([(0, BAD), ("0", BAD), (None, BAD), (MISSING, BAD)])
SID_WHERE = st.sampled_from(["body", "top", "both"])


@st.composite
def start_msg(draw: st.DrawFn, mode: str) -> Msg:
    fields = ["seq", "sid", "account", "call", "tracks", "params", "format", "encoding", "rate"]
    bad = pick_bad(draw, [*fields, "channels", "body"], mode)
    seq = one(draw, "seq", bad, number_valid(), number_invalid())
    sid = one_text(draw, "sid", bad, optional=False, allow_empty=False)
    account = one_text(draw, "account", bad, optional=True, allow_empty=True)
    call = one_text(draw, "call", bad, optional=True, allow_empty=True)
    tracks = one(draw, "tracks", bad, START_TRACKS_OK, START_TRACKS_BAD)
    params = one(draw, "params", bad, PARAMS_OK, PARAMS_BAD)
    encoding = one(
        draw, "encoding", bad, ENCODING_OK, text_invalid(optional=False, allow_empty=False)
    )
    rate = one(draw, "rate", bad, RATE_OK, RATE_BAD)
    channels = one(draw, "channels", bad, number_valid(), number_invalid())
    fmt: dict[str, Any] = draw(extras())
    put(fmt, "encoding", encoding[0])
    put(fmt, "sampleRate", rate[0])
    put(fmt, "channels", channels[0])
    body: dict[str, Any] = draw(extras())
    sid_where = draw(SID_WHERE)
    top_sid = draw(NON_EMPTY_TEXT)
    put(body, "accountSid", account[0])
    put(body, "callSid", call[0])
    put(body, "tracks", tracks[0])
    put(body, "customParameters", params[0])
    body["mediaFormat"] = draw(st.sampled_from([None, [], "fmt"])) if "format" in bad else fmt
    obj: dict[str, Any] = {"event": "start", **draw(extras())}
    put(obj, "sequenceNumber", seq[0])
    if sid[0] is MISSING:
        sid_where = "body"
    if sid_where == "top":
        obj["streamSid"] = sid[0]  # Twilio: the sid at the top level only
    else:
        put(body, "streamSid", sid[0])
        if sid_where == "both":
            obj["streamSid"] = top_sid
    body_bad = "body" in bad
    obj["start"] = draw(st.sampled_from([None, [], "start"])) if body_bad else body

    def judge(ctx: Ctx) -> Outcome:
        if body_bad or "format" in bad:
            return MalformedMessage, ctx
        if any_bad(seq, sid, account, call, tracks, params, encoding, rate, channels):
            return MalformedMessage, ctx
        if ctx.state != "awaiting":
            return UnexpectedMessage, ctx
        names = tracks[1]
        single = TRACK_NAMES.get(names[0]) if len(names) == 1 else None
        after = replace(ctx, state="streaming", default_track=single)
        chosen = params[1]
        max_params, max_chars = ctx.max_parameters, ctx.max_parameter_chars
        if len(chosen) > max_params:
            return LimitExceeded, after
        for key, value in chosen.items():
            size = len(value) if isinstance(value, str) else 0
            if max(len(key), size) > max_chars:
                return LimitExceeded, after
        event = Start(
            stream_sid=StreamSid(sid[1]),
            media_format=MediaFormat(
                encoding[1], rate[1], 1 if channels[1] is None else channels[1]
            ),
            tracks=names,
            account_sid=account[1],
            call_sid=call[1],
            custom_parameters=chosen,
            sequence_number=seq[1],
            raw=body,
        )
        return event, after

    return Msg(obj, judge, "start")


DIGIT_OK = st.builds(lambda s: (s, s), st.sampled_from([*"0123456789*#ABCD", "10"]))
DIGIT_BAD = text_invalid(optional=False, allow_empty=False) | st.just(("123456789", BAD))
DTMF_TRACKS = st.sampled_from([MISSING, None, "inbound_track", "outbound_track", "inbound", "x", 5])
STOP_BODIES = st.sampled_from([MISSING, None, "x", 3]) | st.dictionaries(
    wire_text, faithful_values, max_size=3
)
UNKNOWN_NAMES = st.builds(
    lambda s: (s, s),
    st.sampled_from(["clear", "Media", "START", "sparkle", ""])
    | st.text(WIRE_CHARS, max_size=300).filter(lambda s: s not in KNOWN_EVENTS),
)


@st.composite
def dtmf_msg(draw: st.DrawFn, mode: str) -> Msg:
    bad = pick_bad(draw, ["seq", "body", "digit", "duration"], mode)
    seq = one(draw, "seq", bad, number_valid(), number_invalid())
    digit = one(
        draw,
        "digit",
        bad,
        DIGIT_OK,
        DIGIT_BAD,
    )
    duration = one(draw, "duration", bad, number_valid(), number_invalid())
    raw_track = draw(DTMF_TRACKS)
    body: dict[str, Any] = draw(extras())
    put(body, "digit", digit[0])
    put(body, "duration", duration[0])
    put(body, "track", raw_track)
    obj: dict[str, Any] = {"event": "dtmf", **draw(extras())}
    put(obj, "sequenceNumber", seq[0])
    body_bad = "body" in bad
    obj["dtmf"] = draw(st.sampled_from([None, [], 7])) if body_bad else body
    track = TRACK_NAMES.get(raw_track) if isinstance(raw_track, str) else None

    def judge(ctx: Ctx) -> Outcome:
        if body_bad or any_bad(seq, digit, duration):
            return MalformedMessage, ctx
        if ctx.state != "streaming":
            return UnexpectedMessage, ctx
        return Dtmf(digit[1], duration[1], track, seq[1]), ctx

    return Msg(obj, judge, "dtmf")


@st.composite
def mark_msg(draw: st.DrawFn, mode: str) -> Msg:
    bad = pick_bad(draw, ["seq", "body", "name"], mode)
    seq = one(draw, "seq", bad, number_valid(), number_invalid())
    name = one_text(draw, "name", bad, optional=False, allow_empty=False)
    body: dict[str, Any] = draw(extras())
    put(body, "name", name[0])
    obj: dict[str, Any] = {"event": "mark", **draw(extras())}
    put(obj, "sequenceNumber", seq[0])
    body_bad = "body" in bad
    obj["mark"] = draw(st.sampled_from([None, "mark", [1]])) if body_bad else body

    def judge(ctx: Ctx) -> Outcome:
        if body_bad or any_bad(seq, name):
            return MalformedMessage, ctx
        if ctx.state != "streaming":
            return UnexpectedMessage, ctx
        return Mark(name[1], seq[1]), ctx

    return Msg(obj, judge, "mark")


@st.composite
def stop_msg(draw: st.DrawFn, mode: str) -> Msg:
    bad = pick_bad(draw, ["seq"], mode)
    seq = one(draw, "seq", bad, number_valid(), number_invalid())
    stop = draw(STOP_BODIES)
    obj: dict[str, Any] = {"event": "stop", **draw(extras())}
    put(obj, "sequenceNumber", seq[0])
    put(obj, "stop", stop)

    def judge(ctx: Ctx) -> Outcome:
        if any_bad(seq):
            return MalformedMessage, ctx
        if ctx.state == "stopped":
            return UnexpectedMessage, ctx
        return Stop(seq[1], stop if isinstance(stop, dict) else {}), replace(ctx, state="stopped")

    return Msg(obj, judge, "stop")


@st.composite
def connected_msg(draw: st.DrawFn, mode: str) -> Msg:
    bad = pick_bad(draw, ["seq", "protocol", "version"], mode)
    seq = one(draw, "seq", bad, number_valid(), number_invalid())
    protocol = one_text(draw, "protocol", bad, optional=True, allow_empty=True)
    version = one_text(draw, "version", bad, optional=True, allow_empty=True)
    obj: dict[str, Any] = {"event": "connected", **draw(extras())}
    put(obj, "sequenceNumber", seq[0])
    put(obj, "protocol", protocol[0])
    put(obj, "version", version[0])

    def judge(ctx: Ctx) -> Outcome:
        if any_bad(seq, protocol, version):
            return MalformedMessage, ctx
        return Connected(protocol[1], version[1]), ctx

    return Msg(obj, judge, "connected")


@st.composite
def unknown_msg(draw: st.DrawFn, mode: str) -> Msg:
    """An event name the parser does not know, or no usable event name at all."""
    bad = pick_bad(draw, ["seq", "event"], mode)
    seq = one(draw, "seq", bad, number_valid(), number_invalid())
    name = one(
        draw,
        "event",
        bad,
        UNKNOWN_NAMES,
        text_invalid(optional=False, allow_empty=True),
    )
    obj: dict[str, Any] = draw(extras())
    put(obj, "event", name[0])
    put(obj, "sequenceNumber", seq[0])

    def judge(ctx: Ctx) -> Outcome:
        if any_bad(seq, name):
            return MalformedMessage, ctx
        return UnknownEvent(name[1]), ctx

    return Msg(obj, judge, "unknown")


def message(mode: str) -> st.SearchStrategy[Msg]:
    kinds = [media_msg, start_msg, dtmf_msg, mark_msg, stop_msg, connected_msg, unknown_msg]
    plain = st.one_of([kind(mode) for kind in kinds])
    # SignalWire's older logging envelope: {"timestamp", "direction", "eventType", ..., "rawEvent"}.
    return st.one_of(plain, plain, plain, enveloped(plain))


@st.composite
def enveloped(draw: st.DrawFn, inner: st.SearchStrategy[Msg]) -> Msg:
    msg = draw(inner)
    envelope: dict[str, Any] = {
        "timestamp": draw(st.sampled_from(["2024-01-01T00:00:00Z", 5, None])),
        "direction": draw(st.sampled_from(["inbound", "outbound", MISSING])),
        "eventType": msg.kind,
        "streamSid": draw(wire_text),
        "sequenceNumber": draw(st.sampled_from(["x", -1, "7"])),  # the envelope's: ignored
        "rawEvent": msg.obj,
    }
    envelope = {k: v for k, v in envelope.items() if v is not MISSING}
    if draw(st.integers(0, 4)) == 0:
        # An envelope in an envelope: the inner event, or refused; never a crash.
        return Msg({"rawEvent": envelope}, msg.judge, msg.kind, either_malformed=True)
    return Msg(envelope, msg.judge, msg.kind, msg.either_malformed)


# (max_custom_parameters, max_parameter_chars): the defaults, and small ones that are reached.
LIMITS = st.sampled_from([(99, 4096), (3, 16), (0, 40), (5, 64)])


def protocol_for(limits: tuple[int, int]) -> tuple[StreamProtocol, Ctx]:
    """A protocol with these limits, and the oracle's state for it."""
    protocol = StreamProtocol(max_custom_parameters=limits[0], max_parameter_chars=limits[1])
    return protocol, Ctx(max_parameters=limits[0], max_parameter_chars=limits[1])


def check_outcome(got: Any, expected: Any, msg: Msg) -> None:
    """The parser did what the oracle says."""
    if msg.either_malformed and isinstance(got, MalformedMessage):
        return
    if isinstance(expected, type):
        assert isinstance(got, expected), f"expected {expected.__name__}, got {got!r}"
        return
    assert not isinstance(got, ProtocolError), f"expected {expected!r}, got {got!r}"
    if isinstance(expected, UnknownEvent):
        # The name is kept (maybe cut short, never invented).
        assert isinstance(got, UnknownEvent)
        assert expected.name.startswith(got.name) and len(got.name) <= 256
        assert got.name or not expected.name
        return
    assert got == expected


def advance(protocol: StreamProtocol, ctx: Ctx, msg: Msg, *, ascii_json: bool) -> Ctx | None:
    """Feed one message; check it against the oracle; the next state, or None once it failed."""
    expected, after = msg.judge(ctx)
    got = receive(protocol, msg.text(ascii_json))
    check_outcome(got, expected, msg)
    return None if isinstance(got, ProtocolError) else after


# ---------------------------------------------------------------------------------------------
# Media formats

ENCODINGS = [
    "audio/x-mulaw",
    "audio/x-alaw",
    "audio/x-L16",
    "audio/l16",
    "audio/PCMU",
    "audio/basic",
    "audio/G722",
    "audio/opus",
]


@st.composite
def encodings(draw: st.DrawFn) -> str:
    """Known names in any case, with parameters and spaces, or anything else."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.text(WIRE_CHARS, max_size=60))
    name = draw(st.sampled_from(ENCODINGS))
    name = (
        "".join(c.upper() if draw(st.booleans()) else c for c in name)
        if draw(st.booleans())
        else name
    )
    if draw(st.booleans()):
        name = name + ";" + draw(st.text(WIRE_CHARS, max_size=60))
    return draw(st.sampled_from(["", " ", "\t"])) + name + draw(st.sampled_from(["", " "]))


# ---------------------------------------------------------------------------------------------
# A stream's frames


@dataclass(frozen=True)
class Plan:
    """One track's frames as the platform cut them, before loss, duplication and reordering."""

    track: Track
    frame_samples: int
    samples: NDArray[np.int16]  # the whole track, unique non-zero values

    @property
    def count(self) -> int:
        return -(-len(self.samples) // self.frame_samples)

    def frame(self, i: int) -> NDArray[np.int16]:
        return self.samples[i * self.frame_samples : (i + 1) * self.frame_samples]


def unique_values(start: int, n: int) -> NDArray[np.int16]:
    """``n`` distinct non-zero int16 values (1..32767, then -32768..-1)."""
    assert start + n <= 65535
    k = np.arange(start + 1, start + 1 + n, dtype=np.int64)
    return np.where(k <= 32767, k, k - 65536).astype(np.int16)


@st.composite
def stream_plans(draw: st.DrawFn, *, rate: int, whole_ms: bool) -> list[Plan]:
    """One or two tracks (mixed), frames of 2..40 ms (or any length over 1 ms), unique values."""
    plans: list[Plan] = []
    used = 0
    tracks: list[Track] = draw(
        st.sampled_from(
            [["inbound"], ["outbound"], ["inbound", "outbound"], ["outbound", "inbound"]]
        )
    )
    for track in tracks:
        if whole_ms:
            frame = draw(st.integers(2, 40)) * rate // 1000
        else:
            frame = draw(st.integers(rate // 1000 + 1, rate * 40 // 1000))
        frames = draw(st.integers(0, min(30, 25000 // frame)))
        # Every frame, the last too, is over 1 ms: a repeated sub-millisecond frame without a
        # chunk is within the 1 ms jitter allowance of the track's end, so it cannot be told
        # from the next frame (by design; chunks tell them apart).
        last = draw(st.integers(rate // 1000 + 1, frame)) if frames else 0
        n = max(0, (frames - 1) * frame + last)
        plans.append(Plan(track, frame, unique_values(used, n)))
        used += n
    return plans


@dataclass(frozen=True)
class Sent:
    """A frame as sent, and where it came from (track, index in the plan)."""

    media: Media
    index: int
    exact_ms: int  # the frame's true start in ms (before jitter)


@st.composite
def disorder(
    draw: st.DrawFn, plans: list[Plan], *, rate: int, layout: str, jitter: bool
) -> list[Sent]:
    """Lose, duplicate, delay and jitter frames of each track, then interleave the tracks."""
    per_track: list[list[Sent]] = []
    for plan in plans:
        order: list[int] = []
        for i in range(plan.count):
            if draw(st.integers(0, 5)) == 0:
                continue  # lost
            order.append(i)
            if draw(st.integers(0, 6)) == 0:
                order.append(i)  # duplicated
        # Delay some frames (late delivery) and re-send some old ones much later.
        for _ in range(draw(st.integers(0, 3))):
            if len(order) > 1:
                a = draw(st.integers(0, len(order) - 1))
                b = draw(st.integers(a, len(order) - 1))
                order.insert(b, order.pop(a))
        # Jitter belongs to the frame: a repeated frame repeats its stamp.
        shift = {i: draw(st.integers(-3, 3)) if jitter else 0 for i in sorted(set(order))}
        sent: list[Sent] = []
        for i in order:
            start_sample = i * plan.frame_samples
            exact_ms = start_sample * 1000 // rate
            ts = exact_ms + shift[i]
            payload = encode_l16(plan.frame(i), byte_order="little")
            chunk = i + 1 if layout in {"both", "chunk"} else None
            timestamp = max(0, ts) if layout in {"both", "ts"} else None
            media = Media(plan.track, payload, chunk, timestamp, None)
            sent.append(Sent(media, i, exact_ms))
        per_track.append(sent)
    merged: list[Sent] = []
    while any(per_track):
        pick = draw(st.sampled_from([t for t in per_track if t]))
        merged.append(pick.pop(0))
    return merged


HOSTILE_STEPS = st.sampled_from([0, 1, 1, 1, 2, 5, -1, -3])
HOSTILE_STEP_MS = st.sampled_from([20, 20, 10, 7, 0, 61_000, 3_600_000])
TRACKS: st.SearchStrategy[Track] = st.sampled_from(["inbound", "outbound"])


@functools.cache
def payload_sizes(width: int) -> st.SearchStrategy[int]:
    return st.sampled_from([160 * width, 80 * width, 0, 1, 3]) | st.integers(0, 800)


@functools.cache
def binary_of(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


# Chunks and stamps: absent, near a limit or a frame, anywhere, negative (below the parser).
HOSTILE_NUMBERS = (
    st.none()
    | st.sampled_from([0, 1, 19, 20, 21, 999, 1000, 59_999, 60_000, 60_001])
    | st.integers(0, 10**15 - 1)
    | st.integers(0, 200_000)
    | st.integers(-(10**15), -1)
)


@st.composite
def hostile_frames(draw: st.DrawFn, width: int) -> list[Media]:
    """Frames with any metadata: chunks and stamps anywhere (near the limits, huge, jumping,
    repeated, absent), payloads of any length (odd ones for L16), empty ones."""
    frames = []
    previous_ts = 0
    previous_chunk = 0
    for _ in range(draw(st.integers(0, 30))):
        how = draw(st.integers(0, 3))
        if how == 0:  # wherever
            chunk, ts = draw(HOSTILE_NUMBERS), draw(HOSTILE_NUMBERS)
        else:  # near the last one: a step, a jump, a repeat, a step back
            step = draw(HOSTILE_STEPS)
            previous_chunk += step
            previous_ts += step * draw(HOSTILE_STEP_MS)
            chunk = previous_chunk if draw(st.integers(0, 5)) else None
            ts = previous_ts if draw(st.integers(0, 5)) else None
        size = draw(payload_sizes(width))
        frames.append(Media(draw(TRACKS), draw(binary_of(size)), chunk, ts))
    return frames


@st.composite
def g711_streams(draw: st.DrawFn) -> list[Media]:
    """Platform-like G.711 frames, mixed tracks, lost, repeated, late, jittered, fields dropped."""
    frames: list[Media] = []
    for track in draw(st.sampled_from([["inbound"], ["inbound", "outbound"]])):
        size = draw(st.sampled_from([160, 160, 80, 320]) | st.integers(0, 400))
        for i in range(draw(st.integers(0, 25))):
            if draw(st.integers(0, 5)) == 0:
                continue
            chunk = i + 1 if draw(st.integers(0, 9)) else None
            ts = i * size // 8 + draw(st.sampled_from([0, 0, 0, 1, -1, 7]))
            payload = draw(binary_of(size))
            frame = Media(track, payload, chunk, max(0, ts) if draw(st.integers(0, 9)) else None)
            at = draw(st.integers(max(0, len(frames) - 3), len(frames)))
            frames.insert(at, frame)
            if draw(st.integers(0, 7)) == 0:
                frames.append(frame)
    return frames


# ---------------------------------------------------------------------------------------------
# WebSocket client frames

SPLIT_MAX_SIZE = 1024
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@st.composite
def client_frame(draw: st.DrawFn) -> bytes:
    """One frame as a client may send it, or almost: mostly right, sometimes each way wrong."""
    kind = draw(
        st.sampled_from(
            ["text"] * 6
            + ["text-long", "invalid-utf8", "binary", "ping", "pong", "close", "fragments"]
            + ["unmasked", "reserved-bits", "reserved-opcode", "too-big", "control-too-big"]
        )
    )
    fin, rsv, opcode, masked = True, 0, OP_TEXT, True
    payload = draw(st.text(max_size=40)).encode()
    if kind == "text-long":
        payload = b"x" * draw(st.sampled_from([125, 126, 127, 1000, SPLIT_MAX_SIZE]))
    elif kind == "invalid-utf8":
        payload = draw(st.sampled_from([b"\xff", b"ok\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82"]))
    elif kind == "binary":
        opcode, payload = OP_BINARY, draw(st.binary(max_size=20))
    elif kind in ("ping", "pong"):
        opcode = OP_PING if kind == "ping" else OP_PONG
        payload = draw(st.binary(max_size=125))
    elif kind == "close":
        opcode, payload = OP_CLOSE, draw(st.sampled_from([b"", b"\x03\xe8", b"\x03\xe8bye"]))
    elif kind == "fragments":
        first = draw(st.text(max_size=10)).encode()
        return build_frame(False, 0, OP_TEXT, True, first, draw) + build_frame(
            True, 0, OP_CONT, True, payload, draw
        )
    elif kind == "unmasked":
        masked = False
    elif kind == "reserved-bits":
        rsv = draw(st.sampled_from([0x40, 0x20, 0x10]))
    elif kind == "reserved-opcode":
        opcode = draw(st.sampled_from([0x3, 0x7, 0xB, 0xF]))
    elif kind == "too-big":
        payload = b"y" * (SPLIT_MAX_SIZE + 1)
    elif kind == "control-too-big":
        opcode, payload = draw(st.sampled_from([OP_PING, OP_PONG])), b"z" * 126
    if draw(st.integers(0, 20)) == 0:
        fin = False
    return build_frame(fin, rsv, opcode, masked, payload, draw)


def build_frame(
    fin: bool, rsv: int, opcode: int, masked: bool, payload: bytes, draw: st.DrawFn
) -> bytes:
    """RFC 6455 framing by websockets (``Frame.serialize``, which masks), then the header bent
    where the case asks: reserved bits or opcode, a control frame websockets would refuse to
    build, the length in a longer form than the shortest (legal, and parsed alike)."""
    # A binary frame passes Frame.check whatever its size or fin; the real opcode goes in after.
    frame = Frame(Opcode.BINARY, payload, fin=fin).serialize(mask=masked)
    first = bytes([(0x80 if fin else 0) | rsv | opcode])
    short = frame[1] & 0x7F
    rest = frame[2 + {126: 2, 127: 8}.get(short, 0) :]  # the mask key and the masked payload
    mask_bit = frame[1] & 0x80
    size = len(payload)
    form = draw(st.sampled_from(["short"] * 4 + ["16", "64"]))
    if size < 126 and form == "short":
        length = bytes([mask_bit | size])
    elif size < 65536 and form != "64":
        length = bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        length = bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    return first + length + rest
