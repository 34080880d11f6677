"""Our own accept loop, standing in for the ``asyncio.Server`` that websockets' Server wraps.

Accepting ourselves is what lets the gate act at accept, before any TLS work or memory is
spent on a connection (the loop's own server calls the protocol only once TLS is done, and
uvloop's stops accepting when a protocol factory raises); what lets an ``accept()`` that fails
for lack of fds be seen (uvloop drops it silently, asyncio logs it at every retry); and what
lets a failed TLS handshake be counted with its reason (``loop.connect_accepted_socket``
raises it to us, where the loop's server keeps it to itself).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import struct
from collections.abc import Callable, Sequence
from typing import Any

from receiver.gate import ConnectionGate, PendingHandshake

# accept() errors that mean "out of resources": wait, then try again (the backlog holds the
# clients meanwhile), as asyncio's server does.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RETRY_ACCEPT_S = 0.5
_ACCEPTS_A_WAKEUP = 64
_BACKLOG = 1024


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` names (as ``loop.create_server`` binds)."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE, proto=socket.IPPROTO_TCP
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
            sock.listen(_BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """Accepts connections on ``sockets``; each admitted one goes to ``protocol_factory``
    through ``loop.connect_accepted_socket`` (TLS with ``tls_context`` when set)."""

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        *,
        gate: ConnectionGate,
        protocol_factory: Callable[[PendingHandshake], asyncio.Protocol],
        tls_context: ssl.SSLContext | None,
        tls_handshake_timeout_s: float,
        tls_shutdown_timeout_s: float,
    ) -> None:
        self._sockets = list(sockets)
        self._gate = gate
        self._factory = protocol_factory
        self._tls = tls_context
        self._tls_handshake_timeout_s = tls_handshake_timeout_s
        self._tls_shutdown_timeout_s = tls_shutdown_timeout_s
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._retry: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        self._closed = self._loop.create_future()

    # What websockets' Server uses of an asyncio.Server.

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    def start_serving(self) -> None:
        """Start accepting."""
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting; close the listening sockets; end TLS handshakes in progress."""
        if not self._serving and self._closed.done():
            return
        self._pause()
        self._serving = False
        for sock in self._sockets:
            sock.close()
        for task in list(self._connecting):
            task.cancel()
        if not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)
        if self._connecting:
            await asyncio.wait(set(self._connecting))

    # Accepting.

    def _pause(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self._sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPTS_A_WAKEUP):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    continue  # ECONNABORTED and the like: that client is gone
                self._gate.accept_failed(exc)
                self._pause()
                self._retry = self._loop.call_later(_RETRY_ACCEPT_S, self.start_serving)
                return
            ip = str(address[0]) if address else "unknown"
            handshake = self._gate.admit(ip)
            if handshake is None:
                # A reset, not a FIN: nothing waits in TIME_WAIT for a refused connection.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn, ip, handshake))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, ip: str, handshake: PendingHandshake) -> None:
        kwargs: dict[str, Any] = {}
        if self._tls is not None:
            kwargs = {
                "ssl": self._tls,
                "ssl_handshake_timeout": self._tls_handshake_timeout_s,
                "ssl_shutdown_timeout": self._tls_shutdown_timeout_s,
            }
        try:
            await self._loop.connect_accepted_socket(
                lambda: self._factory(handshake), conn, **kwargs
            )
        except asyncio.CancelledError:
            handshake.release()
            self._gate.closed()
            raise
        except Exception as exc:  # noqa: BLE001 - every way a TLS handshake fails is counted
            handshake.release()
            self._gate.closed()
            self._gate.tls_failed(ip, exc)
