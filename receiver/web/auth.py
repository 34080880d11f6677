"""The web page's login: signed session cookies and a throttle on failed logins.

A session cookie is ``<id>.<expiry>.<signature>``: a random id, the expiry in Unix seconds and
an HMAC-SHA256 of both under a key made at start-up (so a restart logs everyone out). The id
must also be in the table of open sessions, so that logging out ends a session on the server
and not only in the browser. The table is bounded (``max_sessions``; the oldest goes first).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

logger = logging.getLogger("receiver.web")

COOKIE_NAME = "receiver_session"


class Sessions:
    """Open sessions and their signed cookies."""

    def __init__(self, *, lifetime_s: float, max_sessions: int = 1000) -> None:
        self.lifetime_s = lifetime_s
        self.max_sessions = max_sessions
        self._key = secrets.token_bytes(32)
        self._open: OrderedDict[str, float] = OrderedDict()  # id -> expiry (Unix seconds)

    def create(self) -> str:
        """A new session; returns its cookie value."""
        now = time.time()
        self._expire(now)
        while len(self._open) >= self.max_sessions:
            self._open.popitem(last=False)
        session_id = secrets.token_urlsafe(24)
        expiry = int(now + self.lifetime_s)
        self._open[session_id] = expiry
        return f"{session_id}.{expiry}.{self._sign(session_id, expiry)}"

    def check(self, cookie: str | None) -> str | None:
        """The session id of a valid, unexpired, open session's cookie; None otherwise."""
        if not cookie or len(cookie) > 200:
            return None
        session_id, _, rest = cookie.partition(".")
        expiry_text, _, signature = rest.partition(".")
        if not expiry_text.isdigit():
            return None
        expiry = int(expiry_text)
        if not hmac.compare_digest(signature, self._sign(session_id, expiry)):
            return None
        if expiry <= time.time() or self._open.get(session_id) != expiry:
            return None
        return session_id

    def end(self, session_id: str) -> None:
        """Log out: the cookie is no longer accepted, even if a copy of it is kept."""
        self._open.pop(session_id, None)

    def _sign(self, session_id: str, expiry: int) -> str:
        message = f"{session_id}.{expiry}".encode("utf-8", "surrogateescape")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _expire(self, now: float) -> None:
        for session_id, expiry in list(self._open.items()):
            if expiry <= now:
                del self._open[session_id]

    def __len__(self) -> int:
        return len(self._open)


@dataclass(slots=True)
class _Failures:
    count: int
    last: float
    lock: asyncio.Lock


class LoginThrottle:
    """Failed logins per client address, each one answered more slowly than the last.

    The n-th failure within ``window_s`` waits ``base_delay_s * 2**(n-1)`` (at most
    ``max_delay_s``) before its answer, and attempts from one address take turns, so parallel
    guesses are as slow as serial ones. At most ``max_addresses`` are remembered.
    """

    def __init__(
        self,
        *,
        base_delay_s: float = 0.5,
        max_delay_s: float = 8.0,
        window_s: float = 900.0,
        max_addresses: int = 10_000,
    ) -> None:
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.window_s = window_s
        self.max_addresses = max_addresses
        self.failed_total = 0
        self._by_address: OrderedDict[str, _Failures] = OrderedDict()

    def lock(self, address: str) -> asyncio.Lock:
        """The lock that attempts from ``address`` take turns on."""
        entry = self._entry(address)
        return entry.lock

    async def failed(self, address: str) -> int:
        """Count a failure and wait its delay; returns the recent failures from ``address``."""
        entry = self._entry(address)
        now = time.monotonic()
        entry.count = entry.count + 1 if now - entry.last < self.window_s else 1
        entry.last = now
        self.failed_total += 1
        delay = min(self.base_delay_s * 2 ** (entry.count - 1), self.max_delay_s)
        logger.warning(
            "web page: failed login from %s (%d in %d min, %d in all); answering in %.1f s",
            address,
            entry.count,
            self.window_s // 60,
            self.failed_total,
            delay,
        )
        await asyncio.sleep(delay)
        return entry.count

    def succeeded(self, address: str) -> None:
        """Forget the failures of ``address``."""
        entry = self._by_address.get(address)
        if entry is not None:
            entry.count = 0

    def _entry(self, address: str) -> _Failures:
        entry = self._by_address.get(address)
        if entry is None:
            while len(self._by_address) >= self.max_addresses:
                self._by_address.popitem(last=False)
            entry = self._by_address[address] = _Failures(0, -float("inf"), asyncio.Lock())
        else:
            self._by_address.move_to_end(address)
        return entry
