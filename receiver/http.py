"""Plain HTTP on the stream port: the request and response values and the routes' shape.

The connection layer (``receiver.connection``) parses every request with h11 before anything
else; a WebSocket upgrade for a stream goes on to websockets' sans-I/O protocol, every other
request to the route for its path: ``/healthz``, ``/metrics`` when on this port, the platform's
status callbacks. A route is a coroutine from ``HttpRequest`` to ``HttpResponse``; it sees a
body already read whole and bounded by its ``max_body_bytes``, and never the socket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import urlsplit

import h11

TEXT = "text/plain; charset=utf-8"
SERVER_NAME = "receiver"
# A request's line and headers: h11 answers 431 past this (websockets' own bounds were 8 KiB a
# line and 128 headers).
MAX_HEAD_BYTES = 16 * 1024
# Keep-alive requests on one connection, then it is closed: a probe cannot hold a slot forever.
MAX_REQUESTS_A_CONNECTION = 100


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request as read off the connection; header names are lower case."""

    method: str
    target: str  # as sent: path and query, e.g. ``/signalwire/status?x=1``
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    peer_ip: str = "unknown"
    tls: bool = True

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    def header(self, name: str) -> str | None:
        """The value of the header ``name`` (any case), or None; the first if it is repeated."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_count(self, name: str) -> int:
        name = name.lower()
        return sum(1 for key, _ in self.headers if key == name)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What a route answers; the connection layer adds Date, Server and Content-Length."""

    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # close the connection after this response

    @classmethod
    def text(cls, status: int, text: str, **kwargs: object) -> HttpResponse:
        return cls(status, text.encode(), **kwargs)  # type: ignore[arg-type]

    @property
    def reason(self) -> str:
        try:
            return HTTPStatus(self.status).phrase
        except ValueError:
            return ""


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """A plain HTTP endpoint: the methods it takes and the largest body it reads."""

    handler: Handler
    methods: frozenset[str] = field(default_factory=lambda: frozenset({"GET", "HEAD"}))
    max_body_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request h11 could not parse (or too large to take): answer ``status`` and close."""

    status: int
    detail: str


class HttpParser:
    """One connection's HTTP/1.1 server side, over h11, without I/O.

    ``receive`` bytes, then take ``next()`` until it is None: each complete request (its body
    read whole, up to ``body_limit(method, path)`` bytes) or a ``Malformed``. ``respond``
    serializes an answer and readies the next request (keep-alive), up to ``max_requests``.
    After a request that proposed a protocol switch (a WebSocket upgrade), ``trailing`` holds
    the bytes that followed its head: what the client sent before our 101.
    """

    def __init__(
        self,
        *,
        peer_ip: str,
        tls: bool,
        body_limit: Callable[[str, str], int],
        max_head_bytes: int = MAX_HEAD_BYTES,
        max_requests: int = MAX_REQUESTS_A_CONNECTION,
    ) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._peer_ip = peer_ip
        self._tls = tls
        self._body_limit = body_limit
        self._requests_left = max_requests
        self._head: h11.Request | None = None
        self._body = bytearray()
        self._limit = 0
        self._method = "GET"

    def receive(self, data: bytes) -> None:
        self._h11.receive_data(data)

    def receive_eof(self) -> None:
        self._h11.receive_data(b"")

    @property
    def trailing(self) -> bytes:
        return bytes(self._h11.trailing_data[0])

    def next(self) -> HttpRequest | Malformed | None:
        """The next complete request, a ``Malformed``, or None (more bytes needed, or a
        request waits for its answer)."""
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                return Malformed(exc.error_status_hint, str(exc))
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                self._head, self._body = event, bytearray()
                self._method = event.method.decode("ascii", "replace")
                path = urlsplit(event.target.decode("ascii", "replace")).path
                self._limit = self._body_limit(self._method, path)
                declared = _content_length(event.headers)
                if declared is not None and declared > self._limit:
                    return Malformed(413, f"a body of {declared} bytes (limit {self._limit})")
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._limit:
                    return Malformed(413, f"a body past {self._limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                head, self._head = self._head, None
                assert head is not None
                return HttpRequest(
                    method=self._method,
                    target=head.target.decode("ascii", "replace"),
                    headers=tuple(
                        (name.decode("ascii", "replace"), value.decode("latin-1"))
                        for name, value in head.headers
                    ),
                    body=bytes(self._body),
                    peer_ip=self._peer_ip,
                    tls=self._tls,
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def respond(self, response: HttpResponse) -> bytes:
        """``response`` as bytes on the wire; ``must_close`` tells whether to close after it."""
        self._requests_left -= 1
        headers = _head_fields(response, close=response.close or self._requests_left <= 0)
        try:
            out = self._h11.send(
                h11.Response(status_code=response.status, headers=headers, reason=response.reason)
            )
            if self._method != "HEAD" and response.body:
                out = (out or b"") + (self._h11.send(h11.Data(data=response.body)) or b"")
            out = (out or b"") + (self._h11.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:  # the request was unparsable: h11 has no exchange
            self._requests_left = 0
            return serialize_closing(response)
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        return out

    @property
    def must_close(self) -> bool:
        """The connection ends after the last answer (``Connection: close``, either side)."""
        return self._requests_left <= 0 or self._h11.our_state in (h11.MUST_CLOSE, h11.CLOSED)


def serialize_closing(response: HttpResponse) -> bytes:
    """``response`` with ``Connection: close``, without an h11 exchange (a malformed request)."""
    head = [f"HTTP/1.1 {response.status} {response.reason}"]
    head += (f"{name}: {value}" for name, value in _head_fields(response, close=True))
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body


def _head_fields(response: HttpResponse, *, close: bool) -> list[tuple[str, str]]:
    """The header fields of every answer: ours, the route's, and ``Connection: close``."""
    fields = [
        ("Date", formatdate(usegmt=True)),
        ("Server", SERVER_NAME),
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        *response.headers,
    ]
    if close:
        fields.append(("Connection", "close"))
    return fields


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is one decimal number
    return None
