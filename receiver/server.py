"""The thin asyncio shell: handshake gate, then ``message -> protocol -> session -> sinks``.

All decisions about bytes live in the sans-I/O core (``protocol``, ``session``, ``codecs``),
and a stream's life (its sinks, its end and close code, its summary) in ``recording``; this
module only moves messages, applies timeouts, and makes sure that every stream's sinks are
closed however it ends: stop, client close, protocol error, timeout or shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import start_wsgi_server
from websockets.exceptions import ConnectionClosed

from receiver.auth import (
    HEALTH_PATH,
    METRICS_PATH,
    TokenChecker,
    health_route,
    metrics_route,
    stream_gate,
)
from receiver.connection import Connection, HandshakeBudget, ReadTicks, StreamPort
from receiver.exceptions import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    ListenError,
)
from receiver.gate import ConnectionGate, MemoryTrimmer, PendingHandshake
from receiver.health import HealthCheck
from receiver.http import Route
from receiver.listener import Listener, bind
from receiver.logs import QuietInfo
from receiver.metrics import Count, Counters, LiveTracks, ReceiverMetrics
from receiver.recording import StreamRecording
from receiver.session import Session
from receiver.settings import Settings
from receiver.sinks import SinkFactory, sink_factories_for
from receiver.sinks.base import Lifecycle, StreamEnd
from receiver.status import StatusCallbacks

logger = logging.getLogger("receiver.server")

# Endings where the server sends the close (after finishing the files).
_WE_CLOSE = frozenset({"protocol-error", "error", "idle-timeout", "max-duration"})


class Receiver:
    """The receiver server: ``await start()``, then ``await shutdown()`` (or ``async with``).

    ``counters`` (``receiver.metrics.Counters``) counts what happened, each counter exported in
    ``/metrics``; ``gate`` holds the connection limits.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        ssl_context: ssl.SSLContext | None,
        sink_factories: Sequence[tuple[str, SinkFactory]] | None = None,
    ) -> None:
        self.settings = settings
        self.ssl_context = ssl_context
        self.sink_factories = (
            list(sink_factories) if sink_factories is not None else sink_factories_for(settings)
        )
        self.counters = Counters()
        self.per_ip: Counter[str] = Counter()
        self.draining = False
        self._check_token = TokenChecker(settings.token_values)
        self._listener: Listener | None = None
        self._port: StreamPort | None = None
        # The platform's status callbacks (POST on the stream port), joined to each stream.
        self.status = StatusCallbacks.from_settings(settings, counters=self.counters)
        # Plain HTTP routes of the stream port besides /healthz and /metrics (by path).
        self.routes: dict[str, Route] = {settings.status_path: self.status.route()}
        self._metrics_server: Any = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._streams: set[StreamHandler] = set()
        self._active: set[StreamHandler] = set()  # files not yet finished
        self.gate = ConnectionGate(
            counters=self.counters,
            max_pending_handshakes=settings.max_pending_handshakes,
            max_pending_handshakes_per_ip=settings.max_pending_handshakes_per_ip,
            max_write_buffer_bytes=settings.max_write_buffer_bytes,
        )
        # One thread for the shell's housekeeping (the health check, memory trims): the pool
        # that sinks use stays theirs, and the thread count stays put.
        self._housekeeping = ThreadPoolExecutor(1, thread_name_prefix="receiver-housekeeping")
        self.health = HealthCheck(
            settings.recordings_dir,
            min_free_bytes=settings.min_free_disk_mb * 1024 * 1024,
            counters=self.counters,
            executor=self._housekeeping,
        )
        self.metrics = ReceiverMetrics(
            counters=self.counters,
            active_streams=lambda: self.active_streams,
            live_streams=self._live_tracks,
        )
        self._cut_drain = asyncio.Event()
        self._trimmer: asyncio.Task[None] | None = None
        self._started: list[Lifecycle] = []

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(drain_timeout_s=0)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._listener is not None, "not started"
        return int(self._listener.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Start the sinks' per-process resources, bind and start accepting streams."""
        s = self.settings
        self.health.check_now()
        for _, factory in self.sink_factories:
            if isinstance(factory, Lifecycle) and factory not in self._started:
                await factory.start(s, registry=self.metrics.registry)
                self._started.append(factory)
        if s.metrics_port is not None:
            try:
                self._metrics_server, _ = start_wsgi_server(
                    s.metrics_port, addr=s.metrics_host, registry=self.metrics.registry
                )
            except OSError as exc:
                problem = exc.strerror or str(exc)
                raise ListenError(
                    role="metrics", host=s.metrics_host, port=s.metrics_port, problem=problem
                ) from None
        try:
            self._listener = self._listen()
        except OSError as exc:
            self._stop_metrics_server()
            problem = exc.strerror or str(exc)
            raise ListenError(role="streams", host=s.host, port=s.port, problem=problem) from None
        self._housekeeping.submit(int)  # its one thread now: the count stays put from here on
        trimmer = MemoryTrimmer(self.counters, executor=self._housekeeping)
        self._trimmer = asyncio.create_task(trimmer.run())

    def _listen(self) -> Listener:
        """Bind the stream port; every admitted connection is a ``receiver.connection``."""
        s = self.settings
        routes = {
            HEALTH_PATH: health_route(is_draining=lambda: self.draining, health=self.health.problem)
        }
        if s.metrics_port is None:
            routes[METRICS_PATH] = metrics_route(self.metrics.render)
        routes.update(self.routes)
        interval_s = s.read_interval_ms / 1000
        port = StreamPort(
            gate=self.gate,
            admit=stream_gate(
                check_token=self._check_token,
                is_draining=lambda: self.draining,
                connection_gate=self.gate,
                at_capacity=lambda: self.active_streams >= s.max_streams,
                ip_at_capacity=lambda ip: self.per_ip[ip] >= s.max_connections_per_ip,
                on_reject=lambda why: self.counters.add(Count.HANDSHAKE_REJECTIONS, why),
            ),
            on_open=self._open,
            tls_context=self.ssl_context,
            max_message_bytes=s.max_message_bytes,
            handshake_timeout_s=s.handshake_timeout_s,
            close_timeout_s=s.close_timeout_s,
            ping_interval_s=s.ping_interval_s,
            ping_timeout_s=s.ping_timeout_s,
            routes=routes,
            ws_logger=QuietInfo(logging.getLogger("websockets.server")),
            ticks=ReadTicks(asyncio.get_running_loop(), interval_s) if interval_s else None,
            handshakes=HandshakeBudget(asyncio.get_running_loop()),
        )

        def make_connection(handshake: PendingHandshake) -> Connection:
            return Connection(port, handshake)

        listener = Listener(bind(s.host, s.port), gate=self.gate, protocol_factory=make_connection)
        listener.start_serving()
        self._port = port
        return listener

    async def shutdown(self, *, drain_timeout_s: float | None = None) -> None:
        """Stop taking streams, let current ones end for ``drain_timeout_s``, then close the rest
        with 1001 (going away) and finish every file; then stop the sinks' resources."""
        if self._listener is None or self._port is None:
            await self._stop_resources()
            return
        self.draining = True
        timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self._handlers and timeout > 0:
            logger.info("draining %d streams for up to %g s", len(self._handlers), timeout)
            cut = asyncio.ensure_future(self._cut_drain.wait())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while self._handlers and not cut.done():
                        await asyncio.wait({*self._handlers, cut}, return_when="FIRST_COMPLETED")
            cut.cancel()
        await self._close_connections()
        if self._trimmer is not None:
            self._trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trimmer
            self._trimmer = None
        self._housekeeping.shutdown(wait=False)
        await self._stop_resources()
        self._stop_metrics_server()

    async def _close_connections(self) -> None:
        """Stop accepting; every stream gets 1001 once its files are finished; wait for the
        handlers, then for the close handshakes (each bounded by the close timeout)."""
        assert self._listener is not None and self._port is not None
        listener, port = self._listener, self._port
        listener.close()
        await listener.wait_closed()
        for connection in list(port.connections):
            connection.going_away()
        if self._handlers:
            await asyncio.wait(set(self._handlers))
        closing = [asyncio.ensure_future(c.wait_closed()) for c in list(port.connections)]
        if closing:
            _, late = await asyncio.wait(closing, timeout=self.settings.close_timeout_s + 1)
            for connection in list(port.connections):
                connection.transport.abort()
            if late:
                await asyncio.wait(late, timeout=1)
        self._listener = self._port = None

    def _stop_metrics_server(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    async def _stop_resources(self) -> None:
        """Every stream's sinks are closed: now the resources they shared, last started first."""
        while self._started:
            await self._started.pop().stop()

    @property
    def active_streams(self) -> int:
        """Connections past the handshake whose handler still runs (files not yet finished)."""
        return len(self._active)

    @property
    def frames_received(self) -> int:
        """Media frames received so far, by finished and live streams."""
        finished = sum(v for (_, _, f), v in self.metrics.finished.items() if f == "frames")
        live = sum(s.frames for t in self._live_tracks() for s in t.tracks.values())
        return finished + live

    @property
    def metrics_port(self) -> int | None:
        """The bound port of the separate metrics server, if there is one."""
        return int(self._metrics_server.server_port) if self._metrics_server else None

    def _live_tracks(self) -> Iterator[LiveTracks]:
        for stream in list(self._streams):
            if stream.session is not None:
                yield LiveTracks(stream.session.codec.name, stream.session.track_stats)

    def close_now(self) -> None:
        """Cut a running drain short: close the remaining streams with 1001 now."""
        self._cut_drain.set()

    def _open(self, ws: Connection) -> None:
        """A stream's WebSocket is open: it counts against the limits from this moment (the
        next upgrade, maybe in the same loop round, sees it), and its handler runs as a task."""
        ip = ws.peer_ip
        self.per_ip[ip] += 1
        stream = StreamHandler(self, ws)
        self._streams.add(stream)
        self._active.add(stream)

        def finished() -> None:
            """Files finished: the stream no longer counts against the limits, even while its
            close handshake (bounded by the close timeout) goes on."""
            self._streams.discard(stream)  # its figures are the finished ones from now on
            if stream in self._active:
                self._active.discard(stream)
                self.per_ip[ip] -= 1
                if not self.per_ip[ip]:
                    del self.per_ip[ip]

        stream.on_finished = finished
        task = asyncio.get_running_loop().create_task(self._handle(stream))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    @staticmethod
    async def _handle(stream: StreamHandler) -> None:
        try:
            await stream.run()
        finally:
            stream.on_finished()


class Watchdog:
    """Ends a stream that went quiet (idle timeout) or ran too long (max duration).

    One timer per stream, every quarter of the idle timeout, instead of a timeout around every
    ``recv``: it compares message counts, and when a limit is passed it cancels the reading
    task with ``expired`` set (websockets' ``recv`` is cancellation-safe).
    """

    def __init__(self, stream: StreamHandler, loop: asyncio.AbstractEventLoop) -> None:
        settings = stream.settings
        self._stream = stream
        self._loop = loop
        self._task = asyncio.current_task()
        self._idle_s = settings.idle_timeout_s
        self._max_duration_s = settings.max_stream_duration_s
        self._period_s = min(settings.idle_timeout_s / 4, 5.0)
        now = loop.time()
        self._deadline = now + settings.max_stream_duration_s
        self._seen, self._seen_at = -1, now
        self.expired: StreamEnd | None = None
        self._handle = loop.call_later(min(self._period_s, self._max_duration_s), self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if self._stream.messages != self._seen:
            self._seen, self._seen_at = self._stream.messages, now
        if now >= self._deadline:
            reason = f"max stream duration of {self._max_duration_s:g} s reached"
            self.expired = StreamEnd("max-duration", CLOSE_POLICY_VIOLATION, reason)
        elif now - self._seen_at >= self._idle_s:
            reason = f"no message for {self._idle_s:g} s"
            self.expired = StreamEnd("idle-timeout", CLOSE_POLICY_VIOLATION, reason)
        if self.expired is not None and self._task is not None:
            self._task.cancel()
            return
        next_check = min(self._period_s, max(self._deadline - now, 0.0))
        self._handle = self._loop.call_later(next_check, self._check)

    def cancel(self) -> None:
        """Stop watching (the stream ended)."""
        self._handle.cancel()


class StreamHandler:
    """One connection's life: read messages until the stream ends, always closing the sinks.

    The shell around a ``StreamRecording`` (``receiver.recording``), which owns every rule of
    the stream's life; this class moves the messages to it, applies the timeouts and sends the
    close.
    """

    def __init__(self, receiver: Receiver, ws: Connection) -> None:
        self.receiver = receiver
        self.settings = receiver.settings
        self.counters = receiver.counters
        self.ws = ws
        request = ws.request
        assert request is not None, "a stream's handler starts after its upgrade"
        self.recording = StreamRecording(
            receiver.settings,
            receiver.sink_factories,
            counters=receiver.counters,
            metrics=receiver.metrics,
            path=request.path,
            query=request.query,
            remote=ws.peer_ip,
            platform=receiver.status,
        )
        self.on_finished: Callable[[], None] = lambda: None

    @property
    def session(self) -> Session | None:
        """The stream's session, once it started (the live metrics read it)."""
        return self.recording.session

    @property
    def messages(self) -> int:
        """Messages received so far (the watchdog compares them)."""
        return self.recording.messages

    async def run(self) -> None:
        """Read until stop, close or error; finish the sinks; then close if we are ending it.

        Files are finished before the close frame goes out, and before a close the client sent
        with its stop is answered, so a client that sees the close (the simulator, a test, an
        operator) finds every file complete.
        """
        end = StreamEnd("error", CLOSE_INTERNAL_ERROR, "internal error")
        try:
            end = await self._read()
        except Exception:  # a bug of the shell's: the recording's own end in its receive()
            self.counters.add(Count.INTERNAL_ERRORS)
            self.recording.log.exception("internal error")
        finally:
            try:
                end = await self.recording.finish(end)
            finally:
                self.on_finished()
                self.ws.release()  # what the client sent after the end: its close, typically
        if end.kind in _WE_CLOSE and end.close_code is not None:
            await self.ws.close(end.close_code, end.reason or "")
        else:  # the stream is over: 1000 if the client has not closed yet
            await self.ws.close()
        if self.ws.close_timed_out:
            self.counters.add(Count.CLOSE_TIMEOUTS)
            self.recording.log.info(
                "no close frame back within %g s: connection cut", self.settings.close_timeout_s
            )

    async def _read(self) -> StreamEnd:
        watchdog = Watchdog(self, asyncio.get_running_loop())
        try:
            return await self.ws.consume(self.recording.receive)
        except ConnectionClosed as exc:
            return self.recording.closed(
                exc.rcvd,
                exc.sent,
                exc.rcvd_then_sent,
                keepalive_expired=self.ws.keepalive_expired,
                write_overflow=self.ws.write_overflow,
                draining=self.receiver.draining,
            )
        except asyncio.CancelledError:
            if watchdog.expired is None:
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            self.recording.log.warning("closing: %s", watchdog.expired.reason)
            return watchdog.expired
        finally:
            watchdog.cancel()
