"""websockets' server connection, with the platform's text frames split off the hot path.

``StreamConnection`` is websockets' ``ServerConnection`` (handshake, auth hooks, keepalive,
close handshake, errors) until its handler calls ``take_over()``. From then on its bytes go
through ``receiver.frames.TextFrames`` and the handler gets every text message a read brought
in one ``recv_many()`` call; pings, pongs and whatever the splitter hands back still go to
websockets, which carries on as if it had parsed every frame itself. Measured by
``bench.run overhead``, see ``bench/README.md``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State
from websockets.typing import Data

from receiver.frames import TextFrames

# Reading pauses while this much received text waits for the handler (websockets' own queue
# pauses at 16 messages): a bound on each connection's memory when the handler falls behind.
_PAUSE_AT_BYTES = 256 * 1024


class StreamConnection(ServerConnection):
    """A server connection whose handler may take its text frames in batches."""

    # Set per server (``receiver.server``): websockets' max_size, for the splitter.
    max_message_bytes = 65_536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frames: TextFrames | None = None
        self._ready: list[str] = []
        self._ready_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False

    def take_over(self) -> bool:
        """Split frames here from now on, if websockets stands at a frame boundary.

        That is when the connection is open and websockets holds no byte and no message yet,
        which is how the platform's first message finds it. Otherwise (a client that sent before
        the handshake's response, a websockets without these attributes) websockets keeps the
        stream and ``recv_many`` returns its messages one by one. Returns whether it took over.
        """
        buffered = getattr(getattr(self.protocol, "reader", None), "buffer", None)
        queued = getattr(self.recv_messages, "frames", None)
        if (
            self.protocol.state is not State.OPEN
            or buffered is None
            or len(buffered)
            or queued is None
            or len(queued)
        ):
            return False
        self._frames = TextFrames(max_size=self.max_message_bytes)
        return True

    async def recv_many(self) -> Sequence[Data]:
        """The messages received since the last call, in order, at least one.

        Raises ``ConnectionClosed`` once the connection has ended and every message before the
        end was returned, as ``recv()`` does.
        """
        while not self._ready and self._frames is not None:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._ready:
            ready, self._ready, self._ready_bytes = self._ready, [], 0
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resume_reading()
            return ready
        return [await self.recv()]

    def data_received(self, data: bytes) -> None:
        frames = self._frames
        if frames is None:
            super().data_received(data)
            return
        split = frames.feed(data)
        for frame in split.control:
            super().data_received(frame)
        if split.handback is not None:
            self._hand_back(split.handback)
        if split.messages:
            self._ready.extend(split.messages)
            self._ready_bytes += len(data)
            if self._ready_bytes > _PAUSE_AT_BYTES and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> None:
        if self._frames is not None:  # an incomplete frame is websockets' to report
            self._hand_back(self._frames.buffered)
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._frames = None
        super().connection_lost(exc)
        self._wake()

    def _hand_back(self, data: bytes) -> None:
        """websockets parses everything from ``data`` on; ``recv_many`` goes to it when done."""
        self._frames = None
        if data:
            super().data_received(data)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
