"""The platform's side of each stream: its signed status callbacks, joined to the recording.

A stream created with ``StatusCallback`` makes the platform call that URL when the stream
starts, stops or fails (``StreamEvent``: ``stream-started``, ``stream-stopped``,
``stream-error``), with ``ConferenceSid``, ``StreamName`` and ``CallSid``, which the WebSocket's
``start`` does not carry. ``StatusCallbacks.route()`` is the endpoint (on the stream port,
without the bearer token: the platform cannot send one, but it signs every request with the
project's signing key); ``PlatformEvents`` holds what came per ``StreamSid`` (pure, bounded),
until the stream's summary takes it (``platform_fields``) or, once its files are finished,
into its ``stream.json`` (rewritten atomically). A ``stream-error`` for a stream that never
connected is the only trace of a stream the platform could not deliver (an untrusted
certificate, a closed port): it is logged with a hint, counted, and kept on disk.

Signatures (SignalWire's webhook-security guide, its ``compatibility-api`` validator, and
Twilio's ``RequestValidator`` whose scheme it follows), in ``X-SignalWire-Signature`` or its
alias ``X-Twilio-Signature``: form posts carry base64(HMAC-SHA1(key, URL + every parameter's
name and value, sorted by name)), a GET the same over its URL alone (the fields are in its
query); JSON bodies hex(HMAC-SHA1(key, URL + raw body)), or the form scheme over a URL with a
``bodySHA256`` query parameter. Validators try the URL with the default port and without a
port, since the platform's signer is not consistent about it: so do we.

"Never connected" is decided on receipt: a ``stream-error`` names a stream the platform could
not start (the documented errors all say so), and a stream that did connect is known here from
``stream_started`` until its entry expires. No timer is needed, and the warning comes while
the user is still looking at the failed request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from receiver.gate import RateLimitedLog
from receiver.http import HttpRequest, HttpResponse, Route
from receiver.metrics import Count, Counters
from receiver.text import shorten

if TYPE_CHECKING:
    from receiver.settings import Settings

__all__ = [
    "ERROR_HINTS",
    "SIGNATURE_HEADERS",
    "Added",
    "PlatformEvent",
    "PlatformEvents",
    "StatusCallbacks",
    "error_label",
    "form_signature",
    "json_signature",
    "signed_url_forms",
]

SIGNATURE_HEADERS = ("x-signalwire-signature", "x-twilio-signature")
ERRORS_LOG_NAME = "platform-errors.jsonl"
# The callbacks' fields we keep, and their names in stream.json and the events.
_FIELDS = {
    "AccountSid": "account_sid",
    "CallSid": "call_sid",
    "ConferenceSid": "conference_sid",
    "StreamSid": "stream_sid",
    "StreamName": "stream_name",
    "StreamEvent": "event",
    "StreamError": "error",
    "StreamTrack": "track",
    "Timestamp": "timestamp",
}
# Also taken from a JSON body under their own (snake_case) names.
_JSON_ALIASES = {name: name for name in _FIELDS.values()} | {"stream_event": "event"}
# A form has nine fields; a few more are harmless, hundreds are not a callback.
_MAX_FORM_FIELDS = 64
_DEFAULT_PORTS = {"https": 443, "http": 80}

# What to do about each StreamError (the values SignalWire documents; the label is what the
# counter receiver_platform_stream_errors_total{error} uses, so that it stays bounded).
ERROR_HINTS: dict[str, str] = {
    "connection_refused_timeout_or_ssl_error": (
        "the platform could not complete TLS with this receiver: is its certificate publicly "
        "trusted, and is the port open?"
    ),
    "connection_refused": (
        "nothing accepted the platform's connection: is the receiver running, and is the Url's "
        "host and port reachable from the internet (firewall, port forward, tunnel)?"
    ),
    "invalid_url": "the stream's Url was refused: it must be an absolute wss:// URL",
    "missing_url": "the stream request had no Url",
    "invalid_track": "Track must be inbound_track, outbound_track or both_tracks",
    "codec_error": (
        "the platform could not use the StreamCodec: give PCMU, PCMA, L16, L16@16000h or L16@24000h"
    ),
    "general_error": (
        "the platform gives no detail: look for this stream in the dashboard's logs, and in "
        "this log at that time (a refused bearer token is logged as a 401)"
    ),
    "duplicated_stream_id": "a stream with this id exists already (was the request sent twice?)",
    "duplicated_stream_name": (
        "the conference already has a stream of this Name: stop it or choose another name"
    ),
    "unspecified": "the platform sent no StreamError: see the dashboard's logs for the stream",
    "other": "an error this receiver does not know: see the dashboard's logs for the stream",
}


def error_label(error: str | None) -> str:
    """The counter's label of a StreamError: one of ``ERROR_HINTS``' keys (``Duplicated stream
    name`` is ``duplicated_stream_name``; anything unknown is ``other``)."""
    if not error:
        return "unspecified"
    label = "_".join(error.strip().lower().split())
    return label if label in ERROR_HINTS and label != "other" else "other"


# --- Signatures (pure) ------------------------------------------------------------------------


def signed_url_forms(url: str) -> tuple[str, ...]:
    """``url`` as given, with the scheme's default port, and without a port: the forms a
    signature may have been made over (both SignalWire's and Twilio's validators try them)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return (url,)
    netloc, default = parts.netloc, _DEFAULT_PORTS.get(parts.scheme)
    forms = [url]
    if port is None and default is not None:
        forms.append(urlunsplit(parts._replace(netloc=f"{netloc}:{default}")))
    elif port is not None:
        forms.append(urlunsplit(parts._replace(netloc=netloc.rsplit(":", 1)[0])))
    return tuple(dict.fromkeys(forms))


def form_signature(key: str, url: str, params: Iterable[tuple[str, str]] = ()) -> str:
    """base64(HMAC-SHA1(key, url + each name and value, sorted by name)): the form scheme.

    A repeated name's values are sorted and taken once each, as Twilio's validator does.
    """
    values: dict[str, set[str]] = {}
    for name, value in params:
        values.setdefault(name, set()).add(value)
    data = url + "".join(name + v for name in sorted(values) for v in sorted(values[name]))
    digest = hmac.new(key.encode(), data.encode("utf-8", "surrogatepass"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def json_signature(key: str, url: str, body: bytes) -> str:
    """hex(HMAC-SHA1(key, url + raw body)): the scheme of JSON bodies."""
    data = url.encode("utf-8", "surrogatepass") + body
    return hmac.new(key.encode(), data, hashlib.sha1).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("ascii"))


def _signature_valid(
    keys: Sequence[str],
    urls: Sequence[str],
    signature: str,
    *,
    form: Sequence[tuple[str, str]] | None,
    json_body: bytes | None,
    json_params: Sequence[tuple[str, str]] | None,
) -> bool:
    """Whether ``signature`` was made by one of ``keys`` over one of ``urls`` (and the body).

    Every candidate is computed and compared in constant time, so the answer's timing does not
    say which key or URL form came close.
    """
    valid = False
    signature = signature.strip()
    for key in keys:
        for url in urls:
            if form is not None:
                valid |= _same(signature, form_signature(key, url, form))
                continue
            assert json_body is not None
            valid |= _same(signature.lower(), json_signature(key, url, json_body))
            query = dict(parse_qsl(urlsplit(url).query))
            if "bodySHA256" in query:
                body_hash = hashlib.sha256(json_body).hexdigest()
                valid |= _same(signature, form_signature(key, url)) & _same(
                    query["bodySHA256"].lower(), body_hash
                )
            if json_params is not None:
                valid |= _same(signature, form_signature(key, url, json_params))
    return valid


# --- The events store (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlatformEvent:
    """One status callback, its fields as sent (cut to the field bound)."""

    event: str | None
    error: str | None
    track: str | None
    timestamp: str | None
    received_at: str

    def as_dict(self) -> dict[str, str | None]:
        return {
            "event": self.event,
            "error": self.error,
            "track": self.track,
            "timestamp": self.timestamp,
            "received_at": self.received_at,
        }


class Added(Enum):
    """What ``PlatformEvents.add`` did with an event."""

    NEW = "new"  # kept (and the stream's first event, or not)
    DUPLICATE = "duplicate"  # a replay: kept once already
    DROPPED = "dropped"  # past a bound: counted, not kept


@dataclass(slots=True)
class _Stream:
    """What the platform said of one StreamSid, and where the stream is in its life."""

    conference_sid: str | None = None
    stream_name: str | None = None
    call_sid: str | None = None
    account_sid: str | None = None
    events: list[PlatformEvent] = field(default_factory=list)
    keys: set[tuple[str | None, ...]] = field(default_factory=set)
    connections: int = 0  # open WebSockets of this sid (a sid may connect twice)
    connected: bool = False  # ever seen connecting
    finished: bool = False  # its files are done: late events go to its stream.json
    directory: Path | None = None
    reported: int = 0  # events handed to its summary by platform_fields
    touched: float = 0.0


class PlatformEvents:
    """The platform's events per StreamSid, bounded: streams held, events a stream, field
    lengths; each bound counted in ``receiver_platform_events_dropped_total{what}``.

    A stream's entry lives from its first callback or its connection until ``retain_s`` after
    its last touch (a connected stream is never expired or evicted); past ``max_streams`` the
    least recently touched entry that is not connected goes. No I/O here.
    """

    def __init__(
        self,
        *,
        counters: Counters,
        max_streams: int = 10_000,
        max_events_per_stream: int = 32,
        max_field_chars: int = 256,
        retain_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters = counters
        self.max_streams = max_streams
        self.max_events_per_stream = max_events_per_stream
        self.max_field_chars = max_field_chars
        self.retain_s = retain_s
        self._clock = clock
        self._streams: OrderedDict[str, _Stream] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, stream_sid: object) -> bool:
        return stream_sid in self._streams

    def cut(self, fields: Mapping[str, str]) -> dict[str, str]:
        """``fields`` with every value cut to ``max_field_chars`` (each cut counted)."""
        cut: dict[str, str] = {}
        for name, value in fields.items():
            if len(value) > self.max_field_chars:
                self.counters.add(Count.PLATFORM_EVENTS_DROPPED, "field_chars")
                value = value[: self.max_field_chars]
            cut[name] = value
        return cut

    def add(self, fields: Mapping[str, str]) -> tuple[Added, _Stream | None]:
        """Keep one callback's fields (already cut; ``stream_sid`` present)."""
        sid = fields["stream_sid"]
        stream = self._entry(sid)
        if stream is None:
            self.counters.add(Count.PLATFORM_EVENTS_DROPPED, "streams")
            return Added.DROPPED, None
        key = (fields.get("event"), fields.get("timestamp"), fields.get("error"))
        if key in stream.keys:
            return Added.DUPLICATE, stream
        if len(stream.events) >= self.max_events_per_stream:
            self.counters.add(Count.PLATFORM_EVENTS_DROPPED, "events")
            return Added.DROPPED, stream
        stream.keys.add(key)
        stream.events.append(
            PlatformEvent(
                event=fields.get("event"),
                error=fields.get("error"),
                track=fields.get("track"),
                timestamp=fields.get("timestamp"),
                received_at=datetime.now(UTC).isoformat(),
            )
        )
        stream.conference_sid = stream.conference_sid or fields.get("conference_sid")
        stream.stream_name = stream.stream_name or fields.get("stream_name")
        stream.call_sid = stream.call_sid or fields.get("call_sid")
        stream.account_sid = stream.account_sid or fields.get("account_sid")
        return Added.NEW, stream

    def forget(self, stream_sid: str, event: PlatformEvent) -> None:
        """Take back an event whose storing failed, so that the platform's retry stores it."""
        stream = self._streams.get(stream_sid)
        if stream is not None and event in stream.events:
            stream.events.remove(event)
            stream.keys.discard((event.event, event.timestamp, event.error))

    def connected(self, stream_sid: str) -> None:
        """The stream's WebSocket started (its ``start`` came)."""
        stream = self._entry(stream_sid, connecting=True)
        if stream is not None:
            stream.connections += 1
            stream.connected = True
            stream.finished = False

    def fields(self, stream_sid: str, *, report: bool = False) -> dict[str, Any]:
        """The stream's platform fields for its summary or its ``stream.json``; ``report``:
        remember that these events went into the summary."""
        stream = self._streams.get(stream_sid)
        if stream is None:
            return platform_fields_of(None)
        if report:
            stream.reported = len(stream.events)
        return platform_fields_of(stream)

    def finished(self, stream_sid: str, directory: Path | None) -> _Stream | None:
        """The stream's files are finished in ``directory``; its entry, if any."""
        stream = self._streams.get(stream_sid)
        if stream is None:
            return None
        stream.connections = max(0, stream.connections - 1)
        if stream.connections == 0:
            stream.finished = True
        stream.directory = directory or stream.directory
        self._touch(stream_sid, stream)
        return stream

    def _entry(self, sid: str, *, connecting: bool = False) -> _Stream | None:
        """The sid's entry, made if need be; None when every held entry is a live stream."""
        now = self._clock()
        self._expire(now)
        stream = self._streams.get(sid)
        if stream is None:
            # A connecting stream is never refused an entry: live ones are bounded by the
            # receiver's own RECEIVER_MAX_STREAMS.
            full = len(self._streams) >= self.max_streams
            if full and not self._evict_one() and not connecting:
                return None
            stream = _Stream()
            self._streams[sid] = stream
        self._touch(sid, stream, now)
        return stream

    def _touch(self, sid: str, stream: _Stream, now: float | None = None) -> None:
        stream.touched = self._clock() if now is None else now
        self._streams.move_to_end(sid)

    def _expire(self, now: float) -> None:
        """Drop the entries untouched for ``retain_s``: the front of the touch order (past
        the connected ones there, at most RECEIVER_MAX_STREAMS of them)."""
        expired = []
        for sid, stream in self._streams.items():
            if stream.touched >= now - self.retain_s:
                break
            if not stream.connections:
                expired.append(sid)
        for sid in expired:
            del self._streams[sid]

    def _evict_one(self) -> bool:
        for sid, stream in self._streams.items():
            if not stream.connections:
                del self._streams[sid]
                self.counters.add(Count.PLATFORM_EVENTS_DROPPED, "streams")
                return True
        return False


def platform_fields_of(stream: _Stream | None) -> dict[str, Any]:
    """The four keys ``stream.json`` gains, also when the platform said nothing."""
    if stream is None:
        return {
            "conference_sid": None,
            "stream_name": None,
            "platform_call_sid": None,
            "platform_events": [],
        }
    return {
        "conference_sid": stream.conference_sid,
        "stream_name": stream.stream_name,
        "platform_call_sid": stream.call_sid,
        "platform_events": [e.as_dict() for e in stream.events],
    }


# --- The endpoint (the shell's part: HTTP, logs, disk) ----------------------------------------


class _Refused(Exception):
    """A callback answered with an error status, counted under ``outcome``."""

    def __init__(self, status: int, outcome: str, text: str) -> None:
        super().__init__(outcome)
        self.status, self.outcome, self.text = status, outcome, text


class StatusCallbacks:
    """The status callback endpoint and what it keeps; one per ``Receiver``.

    The shell calls, per stream: ``stream_started(sid)`` when its ``start`` arrives;
    ``platform_fields(sid)`` when it ends, before its sinks close, into
    ``StreamSummary.platform``; ``await stream_finished(sid, directory)`` once its files are
    finished. Nothing to start or stop: file writes go through ``asyncio.to_thread``, one at
    a time, and nothing runs between requests.
    """

    def __init__(
        self,
        *,
        signing_keys: Sequence[str],
        recordings_dir: Path,
        counters: Counters,
        public_url: str | None = None,
        max_body_bytes: int = 64 * 1024,
        max_errors_log_bytes: int = 1024 * 1024,
        logger: logging.Logger | None = None,
        **store_limits: Any,
    ) -> None:
        """``store_limits``: ``PlatformEvents``' keyword arguments (its bounds, its clock)."""
        self._keys = tuple(signing_keys)
        self.recordings_dir = recordings_dir
        self.counters = counters
        self.public_url = public_url.rstrip("/") if public_url else None
        self.max_body_bytes = max_body_bytes
        self.max_errors_log_bytes = max_errors_log_bytes
        self.log = logger or logging.getLogger("receiver.status")
        self._refusals = RateLimitedLog(self.log, interval_s=60.0)
        self._errors = RateLimitedLog(self.log, interval_s=10.0)
        self.events = PlatformEvents(counters=counters, **store_limits)
        self._write_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"StatusCallbacks(keys={len(self._keys)}, public_url={self.public_url!r})"

    @classmethod
    def from_settings(cls, settings: Settings, *, counters: Counters) -> StatusCallbacks:
        """From ``receiver.settings.Settings``: its signing keys, public URL, recordings."""
        return cls(
            signing_keys=settings.signing_key_values,
            public_url=settings.public_url,
            recordings_dir=settings.recordings_dir,
            counters=counters,
        )

    @property
    def enabled(self) -> bool:
        """False without a signing key: then every callback is answered 404."""
        return bool(self._keys)

    @property
    def errors_log(self) -> Path:
        """Where the errors of streams that never connected are kept (one JSON a line)."""
        return self.recordings_dir / ERRORS_LOG_NAME

    def route(self) -> Route:
        """The endpoint for RECEIVER_STATUS_PATH: GET and POST, the body bounded."""
        return Route(
            handler=self.handle,
            methods=frozenset({"GET", "POST"}),
            max_body_bytes=self.max_body_bytes,
        )

    # --- The stream's life, called by the shell ------------------------------------------

    def stream_started(self, stream_sid: str) -> None:
        """The stream connected: its events are held for its summary, and a stream-error for
        it is not one of a stream that never arrived. Nothing without a signing key."""
        if self._keys:
            self.events.connected(stream_sid)

    def platform_fields(self, stream_sid: str) -> dict[str, Any]:
        """For ``StreamSummary.platform`` at the stream's end (before its sinks close):
        ``conference_sid``, ``stream_name``, ``platform_call_sid``, ``platform_events``
        (None and [] when nothing came); ``{}`` without a signing key, so that a receiver not
        listening to the platform records nothing of it."""
        if not self._keys:
            return {}
        return self.events.fields(stream_sid, report=True)

    async def stream_finished(self, stream_sid: str, directory: Path | None) -> None:
        """The stream's files are finished in ``directory`` (None: no record sink). A callback
        that came after ``platform_fields`` goes into its ``stream.json`` now; later ones
        as they come."""
        stream = self.events.finished(stream_sid, directory)
        if stream is not None and stream.finished and len(stream.events) > stream.reported:
            try:
                await self._update_record(stream_sid, stream)
            except OSError as exc:
                self.log.error(
                    "stream.json could not take the platform's late events: %s",
                    exc,
                    extra={"stream_sid": shorten(stream_sid)},
                )

    # --- One request -------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Check, keep, answer: 200 stored (or kept already, or past a bound), 403 unsigned,
        404 without a key, 400 not a callback, 500 not written (the platform retries)."""
        try:
            return await self._handle(request)
        except _Refused as refused:
            self.counters.add(Count.STATUS_CALLBACKS, refused.outcome)
            return HttpResponse.text(refused.status, refused.text)

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        if not self._keys:
            self._refusals.log(
                logging.WARNING,
                "not_configured",
                "a status callback came from %s but RECEIVER_SIGNALWIRE_SIGNING_KEY is not set: "
                "answered 404",
                request.peer_ip,
            )
            raise _Refused(404, "not_configured", "not found")
        signature = next(filter(None, map(request.header, SIGNATURE_HEADERS)), None)
        if signature is None:
            self._refused(request, "no_signature", "no X-SignalWire-Signature header")
        form, json_body, json_params, sent = self._parse(request)
        url = self._signed_url(request)
        if url is None or not _signature_valid(
            self._keys,
            signed_url_forms(url),
            signature,
            form=form,
            json_body=json_body,
            json_params=json_params,
        ):
            checked = "no Host header" if url is None else f"checked against {shorten(url, 160)}"
            self._refused(request, "bad_signature", f"the signature does not match ({checked})")
        fields = self.events.cut(sent)
        if not fields.get("stream_sid"):
            self._refusals.log(
                logging.WARNING,
                "no_stream_sid",
                "a signed status callback without a StreamSid: ignored (400)",
            )
            raise _Refused(400, "no_stream_sid", "no StreamSid")
        return await self._keep(fields)

    def _refused(self, request: HttpRequest, outcome: str, why: str) -> NoReturn:
        self._refusals.log(
            logging.WARNING,
            outcome,
            "status callback from %s refused (403): %s (is RECEIVER_SIGNALWIRE_SIGNING_KEY the "
            "project's signing key, and RECEIVER_PUBLIC_URL the URL the platform calls?)",
            request.peer_ip,
            why,
        )
        raise _Refused(403, outcome, "forbidden")

    def _signed_url(self, request: HttpRequest) -> str | None:
        """The URL the platform called: RECEIVER_PUBLIC_URL, else the request's Host and
        scheme, then the path and query as sent."""
        if self.public_url is not None:
            return self.public_url + request.target
        host = request.header("host")
        if not host:
            return None
        return f"{'https' if request.tls else 'http'}://{host}{request.target}"

    def _parse(
        self, request: HttpRequest
    ) -> tuple[
        list[tuple[str, str]] | None, bytes | None, list[tuple[str, str]] | None, dict[str, str]
    ]:
        """(form pairs, JSON body, JSON fields as pairs, the callback's fields) of a request."""
        if request.method == "GET":
            pairs = _form_pairs(request.query)
            return [], None, None, _known(pairs, _FIELDS)
        kind = (request.header("content-type") or "").split(";")[0].strip().lower()
        if kind in ("application/x-www-form-urlencoded", ""):
            pairs = _form_pairs(request.body.decode("latin-1"))
            return pairs, None, None, _known(pairs, _FIELDS)
        if kind == "application/json" or kind.endswith("+json"):
            try:
                data = json.loads(request.body)
            except ValueError:
                data = None
            if not isinstance(data, dict):
                raise _Refused(400, "bad_request", "the body is not a JSON object")
            pairs = [(str(k), v) for k, v in data.items() if isinstance(v, str)]
            strings_only = len(pairs) == len(data)
            fields = _known(pairs, _FIELDS) | _known(pairs, _JSON_ALIASES)
            return None, request.body, pairs if strings_only else None, fields
        raise _Refused(400, "bad_request", "takes a form or a JSON body")

    async def _keep(self, fields: dict[str, str]) -> HttpResponse:
        sid = fields["stream_sid"]
        added, stream = self.events.add(fields)
        if added is Added.DUPLICATE:
            self.counters.add(Count.STATUS_CALLBACKS, "duplicate")
            return HttpResponse(200)
        if added is Added.DROPPED or stream is None:
            self.counters.add(Count.STATUS_CALLBACKS, "dropped")
            self._refusals.log(
                logging.WARNING,
                "dropped",
                "a status callback past a bound (streams held, or events of one): not kept",
            )
            return HttpResponse(200)  # a retry would be dropped too
        event = stream.events[-1]
        self.log.debug(
            "platform: %s", shorten(event.event or "?"), extra={"stream_sid": shorten(sid)}
        )
        never_connected = not stream.connected
        try:
            if event.event == "stream-error" and never_connected:
                await self._keep_error(fields, event)
            if stream.finished and stream.directory is not None:
                await self._update_record(sid, stream)
        except OSError as exc:
            # Taken back, so that the platform's retry (it tries three times) stores it.
            self.events.forget(sid, event)
            self.counters.add(Count.STATUS_CALLBACKS, "write_failed")
            self.log.error(
                "a status callback could not be written: %s",
                exc,
                extra={"stream_sid": shorten(sid)},
            )
            return HttpResponse.text(500, "not stored")
        if event.event == "stream-error":
            self._stream_error(sid, fields, never_connected=never_connected)
        self.counters.add(Count.STATUS_CALLBACKS, "stored")
        return HttpResponse(200)

    def _stream_error(self, sid: str, fields: Mapping[str, str], *, never_connected: bool) -> None:
        error = fields.get("error")
        label = error_label(error)
        self.counters.add(Count.PLATFORM_STREAM_ERRORS, label)
        where = "never reached this receiver" if never_connected else "failed"
        conference = fields.get("conference_sid")
        # At most one line every 10 s per error: an outage fails many streams at once, and
        # each of them is in platform-errors.jsonl (or its stream.json) anyway.
        self._errors.log(
            logging.WARNING,
            label,
            "the platform says stream %s%s %s: %s: %s",
            shorten(sid),
            f" (conference {shorten(conference)})" if conference else "",
            where,
            shorten(error or "no StreamError"),
            ERROR_HINTS[label],
        )

    async def _keep_error(self, fields: Mapping[str, str], event: PlatformEvent) -> None:
        """Append the error to ``platform-errors.jsonl``, which keeps its size bound by
        replacing ``platform-errors.1.jsonl`` (the older errors are dropped, counted)."""
        record = {"received_at": event.received_at, **fields}
        record["hint"] = ERROR_HINTS[error_label(fields.get("error"))]
        line = json.dumps(record, ensure_ascii=True) + "\n"
        async with self._write_lock:
            dropped = await asyncio.to_thread(self._append_error, line.encode("ascii"))
        if dropped:
            self.counters.add(Count.PLATFORM_EVENTS_DROPPED, "error_log")

    def _append_error(self, line: bytes) -> bool:
        """In a thread: append ``line``, first moving a full log aside; True when that
        dropped an older one."""
        path, dropped = self.errors_log, False
        try:
            full = path.stat().st_size + len(line) > self.max_errors_log_bytes
        except FileNotFoundError:
            full = False
        if full:
            older = path.with_name(ERRORS_LOG_NAME.replace(".jsonl", ".1.jsonl"))
            dropped = older.exists()
            os.replace(path, older)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return dropped

    async def _update_record(self, sid: str, stream: _Stream) -> None:
        """Put the stream's platform fields into its finished ``stream.json`` (atomically);
        the fields are read under the lock, so that the last write has every event."""
        assert stream.directory is not None
        async with self._write_lock:
            fields = platform_fields_of(stream)
            try:
                await asyncio.to_thread(_rewrite_record, stream.directory, fields)
            except FileNotFoundError:
                # Uploaded and deleted (RECEIVER_UPLOAD_DELETE_LOCAL), or moved away: a retry
                # would not bring it back. The events stay in memory, for the log.
                self._refusals.log(
                    logging.INFO,
                    "record_gone",
                    "a late status callback's stream.json is gone (uploaded and deleted?): "
                    "not updated",
                )
                return
        stream.reported = len(stream.events)


def _rewrite_record(directory: Path, fields: Mapping[str, Any]) -> None:
    """In a thread: ``stream.json`` with ``fields`` set, replaced whole."""
    from receiver.sinks.wav import RECORD_NAME, write_json_atomic

    path = directory / RECORD_NAME
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise OSError(f"{path} is not a JSON object")
    record.update(fields)
    write_json_atomic(path, record)


def _form_pairs(text: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(text, keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS)
    except ValueError:
        raise _Refused(400, "bad_request", "too many fields") from None


def _known(pairs: Iterable[tuple[str, Any]], names: Mapping[str, str]) -> dict[str, str]:
    """The first value of each known field, under our name."""
    known: dict[str, str] = {}
    for name, value in pairs:
        ours = names.get(name)
        if ours is not None and ours not in known and isinstance(value, str):
            known[ours] = value
    return known
