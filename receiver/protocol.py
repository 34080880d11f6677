"""Sans-I/O parser of one stream's messages: text in, typed events (or ``ProtocolError``) out.

One ``StreamProtocol`` per connection. It accepts both SignalWire's and Twilio's layouts,
numbers as JSON numbers or strings of digits, and the ``rawEvent`` logging envelope; it
enforces the order ``connected? start (media|dtmf|mark)* stop``. No I/O, no asyncio: the
server feeds it, the fuzz tests hammer it.
"""

from __future__ import annotations

import binascii
import enum
from collections.abc import Mapping
from typing import Any

import msgspec

from receiver.events import (
    Connected,
    Dtmf,
    Event,
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
    UnexpectedMessage,
    UnsupportedMedia,
)
from receiver.text import shorten

# Enough digits for any real counter; more is an attack on int parsing, not a stream.
_MAX_DIGITS = 15
_LIMIT = 10**_MAX_DIGITS
_MAX_NAME_CHARS = 256
# The platform's messages nest 3 levels deep. Deeper JSON is refused when parsed, so that the
# record (start and stop are kept verbatim) never meets Python's recursion limit when written.
MAX_JSON_DEPTH = 32
_TRACK_NAMES: Mapping[str, Track] = {
    "inbound": "inbound",
    "outbound": "outbound",
    "inbound_track": "inbound",
    "outbound_track": "outbound",
}


class State(enum.Enum):
    """Where a stream is in its life; the parser moves it forward only."""

    AWAITING_START = "awaiting-start"
    STREAMING = "streaming"
    STOPPED = "stopped"


_STREAMING = State.STREAMING


class StreamProtocol:
    """Parse and order-check the messages of one WebSocket connection.

    ``receive`` returns one event per message or raises a ``ProtocolError`` subclass whose
    ``close_code`` and ``reason`` the server sends back. The parser never raises anything else
    for any input (the fuzz tests hold it to that).
    """

    def __init__(
        self,
        *,
        max_custom_parameters: int = 99,
        max_parameter_chars: int = 4096,
        max_name_chars: int = _MAX_NAME_CHARS,
    ) -> None:
        self.state = State.AWAITING_START
        self.max_custom_parameters = max_custom_parameters
        self.max_parameter_chars = max_parameter_chars
        self.max_name_chars = max_name_chars
        self._single_track: Track | None = None

    def receive(self, message: str | bytes) -> Event:
        """Parse one WebSocket message and check that it may come now."""
        if type(message) is not str:
            raise UnsupportedMedia("binary frames are not part of the stream protocol")
        if self.state is _STREAMING:
            # The platform's plain media message in C, else msgspec's path (bench.core).
            media = _c_media(message, Media)
            if media is None:
                media = _python_fast_media(message)
            if media is not None:
                return media
        event = parse_event(decode_json(message), default_track=self._single_track)
        match event:
            case Start():
                if self.state is not State.AWAITING_START:
                    raise UnexpectedMessage(f"start received while {self.state.value}")
                self.state = State.STREAMING
                if len(event.tracks) == 1 and event.tracks[0] in _TRACK_NAMES:
                    self._single_track = _TRACK_NAMES[event.tracks[0]]
                self._check_parameters(event.custom_parameters)
            case Media() | Dtmf() | Mark():
                if self.state is not State.STREAMING:
                    name = type(event).__name__.lower()
                    raise UnexpectedMessage(f"{name} received while {self.state.value}")
            case Stop():
                if self.state is State.STOPPED:
                    raise UnexpectedMessage("a second stop")
                self.state = State.STOPPED
            case UnknownEvent(name=name) if len(name) > self.max_name_chars:
                return UnknownEvent(name=name[: self.max_name_chars])
            case Connected() | UnknownEvent():
                pass
        return event

    def _check_parameters(self, params: Mapping[str, Any]) -> None:
        if len(params) > self.max_custom_parameters:
            raise LimitExceeded(
                f"{len(params)} custom parameters (limit {self.max_custom_parameters})"
            )
        for name, value in params.items():
            size = max(len(name), len(value) if isinstance(value, str) else len(repr(value)))
            if size > self.max_parameter_chars:
                raise LimitExceeded(f"custom parameter over {self.max_parameter_chars} characters")


def decode_json(text: str) -> dict[str, Any]:
    """One JSON object, unwrapped from the ``rawEvent`` logging envelope when present."""
    try:
        value = _JSON.decode(text)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise MalformedMessage(f"not JSON: {shorten(str(exc), 80)}") from None
    except UnicodeEncodeError:  # a str holding a lone surrogate: not text that JSON can be
        raise MalformedMessage("not JSON: the text is not valid Unicode") from None
    if not isinstance(value, dict):
        raise MalformedMessage(f"a message must be a JSON object, not {_kind(value)}")
    if _nested_deeper_than(value, MAX_JSON_DEPTH):
        raise MalformedMessage(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    raw = value.get("rawEvent")
    if "event" not in value and isinstance(raw, dict):
        value = raw
    return value


def _nested_deeper_than(value: dict[str, Any], limit: int) -> bool:
    """Whether containers nest deeper than ``limit`` (iterative: no recursion of its own)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > limit:
            return True
        items = container.values() if isinstance(container, dict) else container
        stack.extend((item, depth + 1) for item in items if isinstance(item, (dict, list)))
    return False


class _MediaBody(msgspec.Struct):
    track: str
    payload: bytes  # msgspec decodes base64 strictly, as binascii's strict mode does
    chunk: str | int | None = None
    timestamp: str | int | None = None


class _MediaMessage(msgspec.Struct):
    event: str
    media: _MediaBody
    sequenceNumber: str | int | None = None  # the wire's name


_JSON = msgspec.json.Decoder()
_MEDIA = msgspec.json.Decoder(_MediaMessage)
_new_media = tuple.__new__


def _python_fast_media(text: str) -> Media | None:
    """The common media frame in one C call (JSON, base64, types), then the range checks.

    Several times cheaper than JSON, then dict checks and base64 in Python (``python -m
    bench.core`` prints both and their ratio). Returns None for anything unusual (another
    event, a bad field, an unknown track), which the general path then parses or rejects with
    a reason.
    """
    try:
        message = _MEDIA.decode(text)
    except (msgspec.DecodeError, RecursionError, UnicodeEncodeError):
        return None  # the general path names the problem
    body = message.media
    track = _TRACK_NAMES.get(body.track)
    if message.event != "media" or track is None:
        return None
    chunk, timestamp, sequence = body.chunk, body.timestamp, message.sequenceNumber
    if type(chunk) is str and type(timestamp) is str and type(sequence) is str:
        # What the platform sends: three strings of digits, checked at once: cheaper than a
        # _number call each (timeit; ``python -m bench.core`` measures receive as a whole).
        digits = chunk + timestamp + sequence
        if (
            0 < len(chunk) <= _MAX_DIGITS
            and 0 < len(timestamp) <= _MAX_DIGITS
            and 0 < len(sequence) <= _MAX_DIGITS
            and digits.isdigit()
            and digits.isascii()
        ):
            # tuple.__new__, as NamedTuple._make does: the generated __new__ is Python code
            # (``python -m bench.core`` prints both and their ratio).
            return _new_media(
                Media, (track, body.payload, int(chunk), int(timestamp), int(sequence))
            )
        return None
    chunk, timestamp, sequence = _number(chunk), _number(timestamp), _number(sequence)
    if -1 in (chunk, timestamp, sequence):
        return None
    return Media(track, body.payload, chunk, timestamp, sequence)


def _no_media(text: str, cls: type[Media]) -> None:
    return None


try:
    from receiver._speedups import media as _c_media
except ImportError:  # built without a compiler: msgspec's path alone (bench.core)
    _c_media = _no_media


def _number(value: str | int | None) -> int | None:
    """A whole number >= 0 from the fast path's field, None if absent, -1 if invalid."""
    if value is None:
        return None
    if type(value) is int:
        return value if 0 <= value < _LIMIT else -1
    if type(value) is str and 0 < len(value) <= _MAX_DIGITS and value.isdigit() and value.isascii():
        return int(value)
    return -1


def parse_event(obj: Mapping[str, Any], *, default_track: Track | None = None) -> Event:
    """Build the typed event of one decoded message (no order checks)."""
    name = obj.get("event")
    if not isinstance(name, str):
        raise MalformedMessage("message has no string 'event'")
    sequence_number = _opt_int(obj, "sequenceNumber", "")
    match name:
        case "media":
            return _parse_media(obj, sequence_number, default_track)
        case "start":
            return _parse_start(obj, sequence_number)
        case "connected":
            return Connected(
                protocol=_opt_text(obj, "protocol", ""), version=_opt_text(obj, "version", "")
            )
        case "dtmf":
            return _parse_dtmf(obj, sequence_number)
        case "mark":
            body = _object(obj, "mark")
            return Mark(name=_text(body, "name", "mark."), sequence_number=sequence_number)
        case "stop":
            stop = obj.get("stop")
            return Stop(sequence_number=sequence_number, raw=stop if isinstance(stop, dict) else {})
        case _:
            return UnknownEvent(name=name)  # cut to max_name_chars by StreamProtocol


def _parse_media(
    obj: Mapping[str, Any], sequence_number: int | None, default_track: Track | None
) -> Media:
    body = _object(obj, "media")
    payload = body.get("payload")
    if not isinstance(payload, str):
        raise MalformedMessage("media.payload must be a base64 string")
    try:
        audio = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        raise MalformedMessage("media.payload is not valid base64") from None
    raw_track = body.get("track")
    if raw_track is None:
        if default_track is None:
            raise MalformedMessage("media.track is missing")
        track = default_track
    elif isinstance(raw_track, str) and raw_track in _TRACK_NAMES:
        track = _TRACK_NAMES[raw_track]
    else:
        shown = shorten(ascii(raw_track), 24)
        raise MalformedMessage(f"media.track must be inbound or outbound, got {shown}")
    return Media(
        track=track,
        payload=audio,
        chunk=_opt_int(body, "chunk", "media."),
        timestamp_ms=_opt_int(body, "timestamp", "media."),
        sequence_number=sequence_number,
    )


def _parse_start(obj: Mapping[str, Any], sequence_number: int | None) -> Start:
    body = _object(obj, "start")
    sid = body.get("streamSid", obj.get("streamSid"))
    if not isinstance(sid, str) or not sid:
        raise MalformedMessage("start.streamSid must be a non-empty string")
    fmt = _object(body, "mediaFormat", "start.")
    encoding = _text(fmt, "encoding", "start.mediaFormat.")
    rate = _opt_int(fmt, "sampleRate", "start.mediaFormat.")
    if rate is None or rate <= 0:
        raise MalformedMessage("start.mediaFormat.sampleRate must be a positive number")
    channels = _opt_int(fmt, "channels", "start.mediaFormat.")
    tracks = body.get("tracks", [])
    if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
        raise MalformedMessage("start.tracks must be a list of strings")
    params = body.get("customParameters", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise MalformedMessage("start.customParameters must be an object")
    return Start(
        stream_sid=StreamSid(sid),
        media_format=MediaFormat(
            encoding=encoding.strip(),
            sample_rate_hz=rate,
            channels=1 if channels is None else channels,
        ),
        tracks=tuple(t[:_MAX_NAME_CHARS] for t in tracks),
        account_sid=_opt_text(body, "accountSid", "start."),
        call_sid=_opt_text(body, "callSid", "start."),
        custom_parameters=params,
        sequence_number=sequence_number,
        raw=body,
    )


def _parse_dtmf(obj: Mapping[str, Any], sequence_number: int | None) -> Dtmf:
    body = _object(obj, "dtmf")
    digit = _text(body, "digit", "dtmf.")
    if len(digit) > 8:
        raise MalformedMessage("dtmf.digit is longer than 8 characters")
    raw_track = body.get("track")
    track = _TRACK_NAMES.get(raw_track) if isinstance(raw_track, str) else None
    return Dtmf(
        digit=digit,
        duration_ms=_opt_int(body, "duration", "dtmf."),
        track=track,
        sequence_number=sequence_number,
    )


def _object(obj: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise MalformedMessage(f"{prefix}{key} must be an object")
    return value


def _text(obj: Mapping[str, Any], key: str, prefix: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f"{prefix}{key} must be a non-empty string")
    return value


def _opt_text(obj: Mapping[str, Any], key: str, prefix: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedMessage(f"{prefix}{key} must be a string")
    return value


def _opt_int(obj: Mapping[str, Any], key: str, prefix: str) -> int | None:
    """A non-negative whole number sent as a JSON number or a string of digits."""
    value = obj.get(key)
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and 0 < len(value) <= _MAX_DIGITS and value.isdigit():
        number = int(value) if value.isascii() else None
    if number is None or not 0 <= number < 10**_MAX_DIGITS:
        shown = shorten(ascii(value), 24)
        raise MalformedMessage(f"{prefix}{key} must be a whole number >= 0, got {shown}")
    return number


def _kind(value: object) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
