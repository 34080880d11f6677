"""Plain HTTP on the stream port: the request and response values and the routes' shape.

The connection layer (``receiver.connection``) parses every request with h11 before anything
else; a WebSocket upgrade for a stream goes on to websockets' sans-I/O protocol, every other
request to the route for its path: ``/healthz``, ``/metrics`` when on this port, the platform's
status callbacks. A route is a coroutine from ``HttpRequest`` to ``HttpResponse``; it sees a
body already read whole and bounded by its ``max_body_bytes``, and never the socket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urlsplit

TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request as read off the connection; header names are lower case."""

    method: str
    target: str  # as sent: path and query, e.g. ``/signalwire/status?x=1``
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    peer_ip: str = "unknown"
    tls: bool = True
    local_port: int | None = None

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
