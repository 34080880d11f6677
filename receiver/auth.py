"""The handshake gate: ``/healthz``, the bearer-token check, and the stream limit.

The connection layer asks it about every request for a stream before the upgrade, so a
rejected client never reaches a handler and nothing is created on disk for it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from receiver.http import HttpRequest, HttpResponse, Route

if TYPE_CHECKING:
    from receiver.gate import ConnectionGate

HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
logger = logging.getLogger("receiver.auth")


_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


class RedactCredentials(logging.Filter):
    """Blanks credential headers in websockets' DEBUG lines (``"< %s: %s", name, value``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() in _SECRET_HEADERS:
            record.args = (args[0], "[redacted]")
        return True


def redact_websockets_logs() -> None:
    """Install ``RedactCredentials`` on websockets' loggers, once: at DEBUG they log headers.

    A process-wide change, so it is made by the commands (``serve``, ``simulate``), not by
    constructing a ``Receiver``."""
    for name in ("websockets.server", "websockets.client"):
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactCredentials) for f in target.filters):
            target.addFilter(RedactCredentials())


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None if there is none."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class TokenChecker:
    """Constant-time comparison of a presented token against every accepted one.

    Both sides are hashed first so that the comparison takes the same time whatever the
    lengths, and every accepted token is compared, so that timing tells nothing of which one
    matched or how much of it.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("at least one token is required: the receiver never runs open")
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def __call__(self, presented: str) -> bool:
        """True when ``presented`` is one of the accepted tokens."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for accepted in self._digests:
            matched |= hmac.compare_digest(digest, accepted)
        return matched


def stream_gate(
    *,
    check_token: TokenChecker,
    is_draining: Callable[[], bool],
    connection_gate: ConnectionGate,
    at_capacity: Callable[[], bool],
    ip_at_capacity: Callable[[str], bool],
    on_reject: Callable[[str], None],
) -> Callable[[HttpRequest], HttpResponse | None]:
    """The check of a request for a stream, before websockets looks at the upgrade.

    It needs a valid bearer token (401; two Authorization headers: 400), the server must not
    be draining or full (503), and the client's address must be under its connection limit
    (429). ``on_reject`` is told the reason (``auth``, ``draining``, ``capacity``,
    ``ip_limit``) for the counters. None: the stream may open.
    """

    def gate(request: HttpRequest) -> HttpResponse | None:
        ip = request.peer_ip
        if request.header_count("authorization") > 1:
            connection_gate.bad_request(
                ip, reason="duplicate_header", detail="two Authorization headers"
            )
            return HttpResponse.text(400, "one Authorization header, please\n", close=True)
        token = bearer_token(request.header("authorization"))
        if token is None or not check_token(token):
            problem = "no bearer token" if token is None else "wrong bearer token"
            logger.warning("rejected handshake from %s: %s", ip, problem)
            on_reject("auth")
            return HttpResponse.text(
                401,
                "bearer token required\n",
                headers=(("WWW-Authenticate", 'Bearer realm="receiver"'),),
                close=True,
            )
        if is_draining():
            on_reject("draining")
            return HttpResponse.text(503, "shutting down\n", close=True)
        if at_capacity():
            logger.warning("rejected handshake from %s: stream limit reached", ip)
            on_reject("capacity")
            return HttpResponse.text(503, "too many streams\n", close=True)
        if ip_at_capacity(ip):
            logger.warning("rejected handshake from %s: per-address limit", ip)
            on_reject("ip_limit")
            return HttpResponse.text(429, "too many streams from you\n", close=True)
        return None

    return gate


def health_route(*, is_draining: Callable[[], bool], health: Callable[[], str | None]) -> Route:
    """``GET /healthz``, without a token: 200, or 503 while draining or when the recordings
    cannot be written (``health``'s reason)."""

    async def healthz(request: HttpRequest) -> HttpResponse:
        if is_draining():
            return HttpResponse.text(503, "draining\n")
        problem = health()
        if problem is not None:
            return HttpResponse.text(503, f"{problem}\n")
        return HttpResponse.text(200, "ok\n")

    return Route(healthz)


def metrics_route(render: Callable[[], str]) -> Route:
    """``GET /metrics`` on the stream port, without a token (when it has no port of its own)."""

    async def metrics(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, render().encode(), content_type=METRICS_CONTENT_TYPE)

    return Route(metrics)
