"""The handshake gate: ``/healthz``, the bearer-token check, and the stream limit.

It runs as the websockets ``process_request`` hook, before the upgrade, so a rejected client
never reaches a handler and nothing is created on disk for it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import MultipleValuesError
from websockets.http11 import Request, Response

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
    """Install ``RedactCredentials`` on websockets' loggers, once: at DEBUG they log headers."""
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


def make_gate(
    *,
    check_token: TokenChecker,
    is_draining: Callable[[], bool],
    health: Callable[[], str | None],
    connection_gate: ConnectionGate,
    at_capacity: Callable[[], bool],
    ip_at_capacity: Callable[[str], bool],
    on_reject: Callable[[str], None],
    metrics: Callable[[], str] | None = None,
) -> Callable[[ServerConnection, Request], Response | None]:
    """Build the ``process_request`` hook.

    ``GET /healthz`` answers 200 without a token (503 while draining, or with ``health``'s
    reason when the recordings cannot be written), and so does
    ``GET /metrics`` when ``metrics`` renders them on this port; every other request
    needs a valid bearer token (401), the server must not be draining or full (503), and the
    client's address must be under its connection limit (429). ``on_reject`` is told the reason
    (``auth``, ``draining``, ``capacity``, ``ip_limit``) for the counters.
    """

    def gate(connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == HEALTH_PATH:
            if is_draining():
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            problem = health()
            if problem is not None:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{problem}\n")
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == METRICS_PATH and metrics is not None:
            response = connection.respond(HTTPStatus.OK, metrics())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = METRICS_CONTENT_TYPE
            return response
        try:
            header = request.headers.get("Authorization")
        except MultipleValuesError:
            connection_gate.bad_request(
                peer_ip(connection), reason="duplicate_header", detail="two Authorization headers"
            )
            return connection.respond(HTTPStatus.BAD_REQUEST, "one Authorization header, please\n")
        token = bearer_token(header)
        if token is None or not check_token(token):
            problem = "no bearer token" if token is None else "wrong bearer token"
            logger.warning("rejected handshake from %s: %s", peer_ip(connection), problem)
            on_reject("auth")
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "bearer token required\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="receiver"'
            return response
        if is_draining():
            on_reject("draining")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        if at_capacity():
            logger.warning("rejected handshake from %s: stream limit reached", peer_ip(connection))
            on_reject("capacity")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many streams\n")
        if ip_at_capacity(peer_ip(connection)):
            logger.warning("rejected handshake from %s: per-address limit", peer_ip(connection))
            on_reject("ip_limit")
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many streams from you\n")
        return None

    return gate


def count_refusals(
    connection_gate: ConnectionGate,
) -> Callable[[ServerConnection, Request, Response], None]:
    """The ``process_response`` hook: counts and logs the 4xx websockets answers by itself
    (400 a malformed WebSocket handshake, 426 a plain HTTP request for a stream)."""

    def check(connection: ServerConnection, request: Request, response: Response) -> None:
        exc = connection.protocol.handshake_exc  # set for websockets' answers, not the gate's
        if exc is not None and response.status_code in (400, 426):
            reason = "invalid_handshake" if response.status_code == 400 else "not_websocket"
            connection_gate.bad_request(peer_ip(connection), reason=reason, detail=str(exc))

    return check


def peer_ip(connection: ServerConnection) -> str:
    """The client's IP address as text (the TCP peer: behind a proxy, the proxy's)."""
    address = connection.remote_address
    return str(address[0]) if address else "unknown"
