"""A local stand-in for SignalWire's Conference Streams API, over real HTTPS on loopback.

It enforces the documented contract (Basic auth ``project_id:api_token``, the path, a
form-encoded body with only the documented fields, ``Parameter{N}.Name/Value`` numbered from 1
without holes up to 99, a ``wss://`` Url) and answers in the documented shape. Tests can make
it fail the next request with a given status, answer slowly, or act on a created stream.
``mock_transport`` serves the same fake in process (``httpx.MockTransport``); ``serve`` over a
real socket, for the command line in a subprocess.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx

FIELDS = {
    "Url",
    "Name",
    "Track",
    "StreamCodec",
    "StreamRealTime",
    "StatusCallback",
    "StatusCallbackMethod",
    "AuthorizationBearerToken",
}
PARAMETER = re.compile(r"Parameter([1-9][0-9]?)\.(Name|Value)")
ROOT = "/api/laml/2010-04-01"
PATH = re.compile(
    r"/api/laml/2010-04-01/Accounts/(?P<account>[^/]+)/Conferences/(?P<conference>[^/]+)"
    r"/Streams(?:/(?P<stream>[^/]+))?"
)


@dataclass
class Received:
    """One request as the fake saw it."""

    method: str
    path: str
    headers: dict[str, str]
    form: list[tuple[str, str]]


@dataclass
class FakeSignalWire:
    """State and knobs of the fake API."""

    project_id: str
    api_token: str
    conferences: set[str]
    base_url: str = ""
    requests: list[Received] = field(default_factory=list)
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail_next: list[tuple[int, Any]] = field(default_factory=list)
    delay_s: float = 0.0
    on_create: Callable[[dict[str, str]], None] | None = None


def error(status: int, message: str, code: int) -> tuple[int, dict[str, Any]]:
    """A Twilio-compatible error body, as SignalWire's LaML API answers."""
    return status, {
        "code": code,
        "message": message,
        "more_info": "https://developer.signalwire.com",
        "status": status,
    }


def handle(
    fake: FakeSignalWire, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, Any]:
    """The contract, as a pure function of the request."""
    import base64

    expected = "Basic " + base64.b64encode(f"{fake.project_id}:{fake.api_token}".encode()).decode()
    if headers.get("authorization") != expected:
        return error(401, "Authentication Error - invalid username", 20003)
    match = PATH.fullmatch(urlsplit(path).path)
    if method != "POST" or match is None:
        return error(404, f"The requested resource {path} was not found", 20404)
    if unquote(match["account"]) != fake.project_id:
        return error(401, "Authentication Error - account does not match", 20003)
    if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return error(400, "Request body must be application/x-www-form-urlencoded", 20001)
    try:
        form = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
    except ValueError:
        return error(400, "Malformed form body", 20001)
    conference = unquote(match["conference"])
    if conference not in fake.conferences:
        return error(404, f"Conference {conference} was not found", 20404)
    fields = dict(form)
    if len(fields) != len(form):
        return error(400, "Repeated form field", 20001)
    if match["stream"] is not None:
        return update(fake, unquote(match["stream"]), conference, fields)
    return create(fake, conference, fields)


def create(fake: FakeSignalWire, conference: str, fields: dict[str, str]) -> tuple[int, Any]:
    numbers: dict[int, set[str]] = {}
    for name in fields:
        parameter = PARAMETER.fullmatch(name)
        if parameter:
            numbers.setdefault(int(parameter[1]), set()).add(parameter[2])
        elif name not in FIELDS:
            return error(400, f"Unknown parameter {name}", 20001)
    if sorted(numbers) != list(range(1, len(numbers) + 1)) or any(
        v != {"Name", "Value"} for v in numbers.values()
    ):
        return error(400, "Parameters must be numbered from 1, each with Name and Value", 20001)
    url = fields.get("Url", "")
    if not url:
        return error(400, "Missing required parameter Url", 21201)
    if not url.startswith("wss://"):
        return error(422, "Url must use the wss scheme", 21205)
    if fields.get("Track", "both_tracks") not in ("inbound_track", "outbound_track", "both_tracks"):
        return error(422, "Invalid Track", 21206)
    name = fields.get("Name")
    if name and any(s["name"] == name and s["status"] != "stopped" for s in fake.streams.values()):
        return error(422, f"A stream named {name} already exists", 21207)
    sid = str(uuid.uuid4())
    stream = {
        "account_sid": fake.project_id,
        "conference_sid": conference,
        "date_updated": format_datetime(datetime.now(UTC), usegmt=True),
        "name": name or sid,
        "sid": sid,
        "status": "in-progress",
        "uri": f"{ROOT}/Accounts/{fake.project_id}/Conferences/{conference}/Streams/{sid}",
    }
    fake.streams[sid] = stream
    if fake.on_create is not None:
        fake.on_create(fields)
    return 201, stream


def update(
    fake: FakeSignalWire, which: str, conference: str, fields: dict[str, str]
) -> tuple[int, Any]:
    if set(fields) != {"Status"} or fields["Status"] != "stopped":
        return error(400, "Only Status=stopped is accepted", 20001)
    for stream in fake.streams.values():
        if stream["conference_sid"] == conference and which in (stream["sid"], stream["name"]):
            stream["status"] = "stopped"
            stream["date_updated"] = format_datetime(datetime.now(UTC), usegmt=True)
            return 200, stream
    return error(404, f"Stream {which} was not found", 20404)


def answer(
    fake: FakeSignalWire, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, str, bytes]:
    """Record the request and answer it: status, content type, body (both transports)."""
    fake.requests.append(
        Received(method, path, headers, parse_qsl(body.decode(), keep_blank_values=True))
    )
    if fake.fail_next:
        status, payload = fake.fail_next.pop(0)
    else:
        status, payload = handle(fake, method, path, headers, body)
    if isinstance(payload, bytes):
        return status, "text/html", payload
    return status, "application/json", json.dumps(payload).encode()


def mock_transport(fake: FakeSignalWire) -> httpx.MockTransport:
    """``fake`` in process, for ``ConferenceStreamsClient(transport=...)``: no socket, no TLS."""

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        path = request.url.raw_path.decode()
        status, ctype, data = answer(fake, request.method, path, headers, request.read())
        return httpx.Response(status, content=data, headers={"Content-Type": ctype})

    fake.base_url = "https://fake.signalwire.test"
    return httpx.MockTransport(handler)


def serve(fake: FakeSignalWire, cert: Path, key: Path) -> ThreadingHTTPServer:
    """Serve ``fake`` over HTTPS on a free loopback port, in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self._answer("POST")

        def do_GET(self) -> None:
            self._answer("GET")

        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, ctype, data = answer(fake, method, self.path, headers, body)
            if fake.delay_s:
                time.sleep(fake.delay_s)  # the request took effect; its answer comes late
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    fake.base_url = f"https://localhost:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
