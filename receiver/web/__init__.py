"""The web page: live streams with their levels, finished recordings to listen to, a JSON API.

``receiver serve`` runs it beside the ``Receiver``, in the same process and event loop (it
shows the live streams' state), on its own address (``RECEIVER_UI_HOST``/``RECEIVER_UI_PORT``)
so that it need not be public::

    ui = WebUI(settings)
    receiver = Receiver(settings, ssl_context=context, sink_factories=[*factories, ui.sink()])
    exit_code = await ui.serving(run_receiver())     # starts the page, runs, stops the page

Starlette on uvicorn serve it; uvicorn's ``Server`` runs as tasks of the loop without its
signal handlers, so that the receiver's SIGTERM drain stays in charge.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from receiver.auth import TokenChecker
from receiver.sinks.base import SinkFactory
from receiver.web.app import WebApp, WebConfig
from receiver.web.levels import LiveLevels

if TYPE_CHECKING:
    import uvicorn

    from receiver.settings import Settings

__all__ = ["LiveLevels", "WebApp", "WebConfig", "WebUI"]

logger = logging.getLogger("receiver.web")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class WebUI:
    """The web page's server: ``await start()``, ``await stop()``, or ``await serving(main)``."""

    def __init__(self, settings: Settings, *, levels: LiveLevels | None = None) -> None:
        self.settings = settings
        self.levels = levels or LiveLevels()
        self.tls = settings.tls_cert is not None and settings.tls_key is not None
        tokens = settings.ui_token_values or settings.token_values
        self.app = WebApp(
            WebConfig(
                recordings_dir=settings.recordings_dir,
                secure_cookie=self.tls,
                session_lifetime_s=settings.ui_session_s,
                max_listed=settings.ui_max_listed,
            ),
            check_token=TokenChecker(tokens),
            levels=self.levels,
        )
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._main_loop: asyncio.Task[None] | None = None

    def sink(self) -> tuple[str, SinkFactory]:
        """The sink that feeds the live view, for ``Receiver(sink_factories=...)``."""
        return self.levels.sink()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._socket is not None, "not started"
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """The page's address, for the log line and tests."""
        host = self.settings.ui_host
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{shown}:{self.port}/"

    async def start(self) -> None:
        """Bind (``OSError`` when the address is taken) and start serving."""
        import uvicorn

        s = self.settings
        assert s.ui_port is not None, "RECEIVER_UI_PORT is empty: the page is off"
        family = socket.AF_INET6 if ":" in s.ui_host else socket.AF_INET
        self._socket = socket.create_server((s.ui_host, s.ui_port), family=family)
        config = uvicorn.Config(
            self.app.asgi,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            ws="none",
            ssl_certfile=s.tls_cert if self.tls else None,
            ssl_keyfile=s.tls_key if self.tls else None,
            timeout_graceful_shutdown=2,
        )
        config.load()
        self._server = uvicorn.Server(config)
        # startup/main_loop/shutdown rather than serve(): serve() installs signal handlers.
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._socket])
        self._main_loop = asyncio.create_task(self._server.main_loop())
        if not self.tls and s.ui_host not in _LOOPBACK:
            logger.warning(
                "the web page is served over plain HTTP on %s: login tokens and cookies cross "
                "the network in clear text; set RECEIVER_TLS_CERT/KEY or bind 127.0.0.1",
                s.ui_host,
            )
        logger.info("web page on %s (login with a bearer token)", self.url)

    async def stop(self) -> None:
        """Close the live views, finish the requests under way, close the socket."""
        self.app.closing.set()
        if self._server is None:
            return
        self._server.should_exit = True
        if self._main_loop is not None:
            await self._main_loop
        await self._server.shutdown(sockets=[self._socket] if self._socket else None)
        self._server = None

    async def serving(self, main: Coroutine[Any, Any, int]) -> int:
        """Run ``main`` (the receiver) with the page beside it; 1 when the page cannot bind."""
        try:
            await self.start()
        except OSError as exc:
            main.close()
            logger.error(
                "web page: cannot listen on %s:%s: %s",
                self.settings.ui_host,
                self.settings.ui_port,
                exc.strerror or exc,
            )
            return 1
        try:
            return await main
        finally:
            try:
                await self.stop()
            except Exception:
                logger.exception("web page: error while stopping")
