"""The web page's HTTP side: a Starlette application (pages, JSON API, files, live events).

Every route but ``/login`` and ``/static/*`` needs the session cookie: pages redirect to
``/login`` without it, API and file routes answer 401. Nothing changes state on a GET; a POST
must come from the page's own origin (``Origin`` checked, and the cookie is SameSite=Strict).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from receiver.auth import TokenChecker
from receiver.sinks.wav import RECORD_NAME
from receiver.text import shorten
from receiver.web.auth import COOKIE_NAME, LoginThrottle, Sessions
from receiver.web.levels import LiveLevels
from receiver.web.recordings import (
    RecordingsIndex,
    Waveforms,
    read_record,
    resolve_dir,
    resolve_file,
)

logger = logging.getLogger("receiver.web")

STATIC = resources.files("receiver.web") / "static"
_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
_MAX_LOGIN_BODY_BYTES = 4096
_MAX_PER_PAGE = 200
# Scripts, styles, audio and data from this origin only; no frames, no inline script.
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"media-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        b"form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: with no-referrer a form POST carries "Origin: null".
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


@dataclass(frozen=True, slots=True)
class WebConfig:
    """What the application needs, taken from the settings by ``WebUI``."""

    recordings_dir: Path
    secure_cookie: bool
    session_lifetime_s: float
    max_listed: int
    live_interval_s: float = 0.1
    max_event_streams: int = 50
    waveform_points: int = 1000


class _SecurityHeaders:
    """Adds ``_SECURITY_HEADERS`` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + _SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


Handler = Callable[[Request], Awaitable[Response]]


class WebApp:
    """The routes and the state behind them; ``asgi`` is what uvicorn serves."""

    def __init__(self, config: WebConfig, *, check_token: TokenChecker, levels: LiveLevels) -> None:
        self.config = config
        self.check_token = check_token
        self.levels = levels
        self.sessions = Sessions(lifetime_s=config.session_lifetime_s)
        self.throttle = LoginThrottle()
        self.index = RecordingsIndex(config.recordings_dir, max_listed=config.max_listed)
        self.waveforms = Waveforms(points=config.waveform_points)
        self.closing = asyncio.Event()
        self.event_streams = 0
        self._event, self._event_at = "", -math.inf
        self.counters: dict[str, int] = {
            "logins": 0,
            "failed_logins": 0,
            "unauthenticated": 0,
            "bad_origin": 0,
            "event_streams_refused": 0,
        }
        page, api = self._page, self._api
        routes = [
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/static/{name}", self.static, methods=["GET"]),
            Route("/", page(self.list_page), methods=["GET"]),
            Route("/streams/{directory}", page(self.stream_page), methods=["GET"]),
            Route("/api/streams", api(self.api_streams), methods=["GET"]),
            Route("/api/streams/{directory}", api(self.api_stream), methods=["GET"]),
            Route("/api/streams/{directory}/waveform", api(self.api_waveform), methods=["GET"]),
            Route("/api/live", api(self.api_live), methods=["GET"]),
            Route("/api/live/events", api(self.api_live_events), methods=["GET"]),
            Route("/files/{directory}/{name}", api(self.file), methods=["GET", "HEAD"]),
        ]
        app = Starlette(routes=routes)
        # No redirects to a path without its trailing slash: a path that does not match is 404.
        app.router.redirect_slashes = False
        self.asgi = _SecurityHeaders(app)

    # --- the session -------------------------------------------------------------------

    def _session(self, request: Request) -> str | None:
        return self.sessions.check(request.cookies.get(COOKIE_NAME))

    def _page(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if self._session(request) is None:
                self.counters["unauthenticated"] += 1
                return RedirectResponse("/login", status_code=303)
            return await handler(request)

        return guarded

    def _api(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if self._session(request) is None:
                self.counters["unauthenticated"] += 1
                return JSONResponse({"error": "login required"}, status_code=401)
            return await handler(request)

        return guarded

    def _same_origin(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        expected = f"{request.url.scheme}://{request.url.netloc}"
        if origin != expected:
            self.counters["bad_origin"] += 1
            logger.warning(
                "web page: refused a POST %s from origin %s",
                shorten(request.url.path, 80),
                shorten(origin or "(none)", 80),
            )
            return False
        return True

    async def login_page(self, request: Request) -> Response:
        if self._session(request) is not None:
            return RedirectResponse("/", status_code=303)
        return self._login_form()

    def _login_form(self, message: str = "", status_code: int = 200) -> HTMLResponse:
        html = _static_text("login.html").replace(
            "<!--message-->",
            f'<p class="error" role="alert">{escape(message)}</p>' if message else "",
        )
        return HTMLResponse(html, status_code=status_code)

    async def login(self, request: Request) -> Response:
        if not self._same_origin(request):
            return PlainTextResponse("cross-origin request refused\n", status_code=403)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_LOGIN_BODY_BYTES:
                return PlainTextResponse("request too large\n", status_code=413)
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        token = (fields.get("token") or [""])[0]
        address = request.client.host if request.client else "unknown"
        async with self.throttle.lock(address):
            if not token or not self.check_token(token):
                self.counters["failed_logins"] += 1
                await self.throttle.failed(address)
                return self._login_form("That token is not accepted.", status_code=401)
            self.throttle.succeeded(address)
        self.counters["logins"] += 1
        logger.info("web page: login from %s (%d open sessions)", address, len(self.sessions) + 1)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            self.sessions.create(),
            max_age=int(self.sessions.lifetime_s),
            path="/",
            secure=self.config.secure_cookie,
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        if not self._same_origin(request):
            return PlainTextResponse("cross-origin request refused\n", status_code=403)
        session_id = self._session(request)
        if session_id is not None:
            self.sessions.end(session_id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(
            COOKIE_NAME,
            path="/",
            secure=self.config.secure_cookie,
            httponly=True,
            samesite="strict",
        )
        return response

    # --- pages and static files ---------------------------------------------------------

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        kind = _STATIC_TYPES.get(Path(name).suffix)
        if kind is None or not name.replace(".", "").replace("-", "").isalnum():
            return PlainTextResponse("not found\n", status_code=404)
        try:
            data = (STATIC / name).read_bytes()
        except (OSError, ValueError):
            return PlainTextResponse("not found\n", status_code=404)
        return Response(data, media_type=kind)

    async def list_page(self, request: Request) -> Response:
        return HTMLResponse(_static_text("list.html"))

    async def stream_page(self, request: Request) -> Response:
        if resolve_dir(self.config.recordings_dir, request.path_params["directory"]) is None:
            return PlainTextResponse("not found\n", status_code=404)
        return HTMLResponse(_static_text("stream.html"))

    # --- the JSON API -------------------------------------------------------------------

    async def api_streams(self, request: Request) -> Response:
        query = request.query_params
        page = _int(query.get("page"), 1, low=1, high=1_000_000)
        per_page = _int(query.get("per_page"), 25, low=1, high=_MAX_PER_PAGE)
        date = query.get("date", "")[:10]
        total, rows = await self.index.search(
            text=query.get("q", "")[:200], date=date, offset=(page - 1) * per_page, limit=per_page
        )
        return JSONResponse(
            {
                "live": self.levels.snapshot(),
                "finished": rows,
                "total": total,
                "page": page,
                "per_page": per_page,
                "pages": max(1, math.ceil(total / per_page)),
                "not_listed": self.index.not_listed,
            }
        )

    async def api_stream(self, request: Request) -> Response:
        directory = request.path_params["directory"]
        found = resolve_dir(self.config.recordings_dir, directory)
        record = await asyncio.to_thread(read_record, found / RECORD_NAME) if found else None
        if found is None or record is None:
            return JSONResponse({"error": "no such stream"}, status_code=404)
        files = await asyncio.to_thread(self._files_of, found, record)
        return JSONResponse({"directory": directory, "record": record, "files": files})

    def _files_of(self, directory: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
        named = record.get("files") if isinstance(record.get("files"), dict) else {}
        files = []
        for track, name in [*(named or {}).items(), ("record", RECORD_NAME)]:
            path = resolve_file(directory.parent, directory.name, str(name))
            if path is None:
                continue
            files.append(
                {
                    "track": str(track),
                    "name": path.name,
                    "bytes": path.stat().st_size,
                    "url": f"/files/{directory.name}/{path.name}",
                }
            )
        return files

    async def api_waveform(self, request: Request) -> Response:
        found = resolve_dir(self.config.recordings_dir, request.path_params["directory"])
        record = await asyncio.to_thread(read_record, found / RECORD_NAME) if found else None
        if found is None or record is None:
            return JSONResponse({"error": "no such stream"}, status_code=404)
        try:
            waveform = await self.waveforms.of(found, record)
        except (OSError, RuntimeError) as exc:
            logger.warning("web page: no waveform for %s: %s", found.name, exc)
            return JSONResponse({"error": "audio unreadable"}, status_code=500)
        return JSONResponse(waveform)

    async def api_live(self, request: Request) -> Response:
        return JSONResponse({"live": self.levels.snapshot()})

    async def api_live_events(self, request: Request) -> Response:
        """Server-sent events: the live streams and their levels every ``live_interval_s``."""
        if self.event_streams >= self.config.max_event_streams:
            self.counters["event_streams_refused"] += 1
            logger.warning(
                "web page: refused a live view, %d already open", self.config.max_event_streams
            )
            return JSONResponse({"error": "too many live views"}, status_code=503)
        cookie = request.cookies.get(COOKIE_NAME)
        return StreamingResponse(
            self._live_events(cookie),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
        )

    async def _live_events(self, cookie: str | None) -> AsyncIterator[str]:
        # Counted from here, where the finally that uncounts it is sure to run: a client gone
        # before its response started never starts this.
        self.event_streams += 1
        try:
            yield "retry: 1000\n\n"
            interval = self.config.live_interval_s
            while not self.closing.is_set() and self.sessions.check(cookie) is not None:
                yield self._live_event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closing.wait(), timeout=interval)
        finally:
            self.event_streams -= 1

    def _live_event(self) -> str:
        """The live event of this tick, encoded once for every open view."""
        now = time.monotonic()
        if now - self._event_at >= self.config.live_interval_s / 2:
            payload = {"live": self.levels.snapshot(), "at": time.time()}
            self._event, self._event_at = f"data: {json.dumps(payload)}\n\n", now
        return self._event

    async def file(self, request: Request) -> Response:
        path = resolve_file(
            self.config.recordings_dir,
            request.path_params["directory"],
            request.path_params["name"],
        )
        if path is None:
            return PlainTextResponse("not found\n", status_code=404)
        media = {".wav": "audio/wav", ".flac": "audio/flac", ".json": "application/json"}
        return FileResponse(path, media_type=media[path.suffix])


def _static_text(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _int(text: str | None, default: int, *, low: int, high: int) -> int:
    try:
        value = int(text) if text is not None else default
    except ValueError:
        value = default
    return min(max(value, low), high)
