"""Our own accept loop: the gate acts at accept, before any TLS work or memory is spent.

Accepting ourselves is what lets a connection be refused before its protocol exists (uvloop's
server stops accepting when a protocol factory raises), and what lets an ``accept()`` that
fails for lack of fds be seen (uvloop drops it silently, asyncio logs it at every retry). Each
admitted socket becomes a plain TCP transport (``loop.connect_accepted_socket``); TLS is the
connection's own (``receiver.connection``).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable, Sequence

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
    """Accepts connections on ``sockets``; each admitted one goes to ``protocol_factory``."""

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        *,
        gate: ConnectionGate,
        protocol_factory: Callable[[PendingHandshake], asyncio.Protocol],
    ) -> None:
        self._sockets = list(sockets)
        self._gate = gate
        self._factory = protocol_factory
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._retry: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        self._closed = self._loop.create_future()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def start_serving(self) -> None:
        """Start accepting."""
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting; close the listening sockets."""
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
            task = self._loop.create_task(self._connect(conn, handshake))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, handshake: PendingHandshake) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: self._factory(handshake), conn)
        except (asyncio.CancelledError, OSError):  # closing, or the client already gone
            handshake.release()
            self._gate.closed()
            conn.close()
