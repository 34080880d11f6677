"""What one connection may hold before and after its handshake: the shell's limits as policy.

The connection layer (``receiver.connection``) asks this object whether to admit a TCP
connection at accept, tells it when the handshake is over, when TLS failed and when a client
stopped reading; the decisions, the counters and the log lines live here, so that they survive
a change of connection layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor

from receiver.metrics import Count, Counters
from receiver.text import shorten

logger = logging.getLogger("receiver.gate")


# After this many connections ended, freed memory is handed back to the OS (MemoryTrimmer).
TRIM_AFTER_CONNECTIONS = 100
# Under steady churn there is no quiet second: trim anyway after this many.
TRIM_ANYWAY_AFTER_CONNECTIONS = 1000
_TRIM_CHECK_S = 1.0


class MemoryTrimmer:
    """Hands the memory of ended connections back to the OS after a flood: ``malloc_trim(0)``.

    Measured (bench/flood.py, uvloop, 5,000 idle / half-open / TLS-idle connections a round):
    RSS 73 -> 311 -> 485 -> 640 -> 762 MB over 4 rounds without it, every Python object freed
    (no leak: gc counts back to the baseline), the rest held by glibc's heap, which does not
    give back pages freed below its top; with a trim after each round RSS falls to 91-97 MB.
    The trim takes 20-40 ms, so it runs in a thread. Not glibc: nothing to do. It counts
    ``Count.CONNECTIONS_CLOSED``, which the connection layer adds to.
    """

    def __init__(self, counters: Counters, *, executor: Executor | None = None) -> None:
        self._counters = counters
        self._executor = executor
        self._trimmed_at = 0
        self._trim: Callable[[int], int] | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim

    async def run(self) -> None:
        """Check every second; trim once enough connections closed since the last trim and the
        wave of them is over, or after many in any case."""
        if self._trim is None:
            return
        seen = 0
        while True:
            await asyncio.sleep(_TRIM_CHECK_S)
            closed = self._counters[Count.CONNECTIONS_CLOSED]
            since = closed - seen
            seen = closed
            due = closed - self._trimmed_at
            # "Over": under a tenth of that closed in the last second (health checks go on).
            wave_over = due >= TRIM_AFTER_CONNECTIONS and since < TRIM_AFTER_CONNECTIONS // 10
            if wave_over or due >= TRIM_ANYWAY_AFTER_CONNECTIONS:
                self._trimmed_at = closed
                # An ended connection's objects are in reference cycles: until a full collection
                # frees them, their memory is not free for the trim to hand back.
                started = time.perf_counter()
                gc.collect()
                collected = time.perf_counter()
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self._trim, 0)
                self._counters.add(Count.MEMORY_TRIMS)
                logger.info(
                    "memory handed back after %d closed connections (gc %.0f ms, trim %.0f ms)",
                    due,
                    (collected - started) * 1000,
                    (time.perf_counter() - collected) * 1000,
                )


class RateLimitedLog:
    """At most one line per key every ``interval_s``; the next says how many were left out."""

    def __init__(self, target: logging.Logger, *, interval_s: float = 10.0) -> None:
        self._target = target
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._skipped: Counter[str] = Counter()

    def log(self, level: int, key: str, message: str, *args: object) -> None:
        """Log ``message % args`` at ``level`` unless ``key`` was logged in the last interval."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._skipped[key] += 1
            return
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        if skipped:
            message += f" (and {skipped} more like it in the last {self._interval_s:g} s)"
        self._target.log(level, message, *args)


def tls_failure_reason(exc: BaseException) -> str:
    """A short label of why a TLS handshake failed, for the counter."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "HTTP_REQUEST":
            return "plain_http"  # OpenSSL saw "GET " or "POST": http:// or ws:// to wss://
        return "ssl_error"
    return "connection_lost"


class PendingHandshake:
    """One handshake in progress; ``release()`` (idempotent) when it is over, however."""

    def __init__(self, gate: ConnectionGate, ip: str) -> None:
        self._gate: ConnectionGate | None = gate
        self.ip = ip

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._over(self.ip)


class ConnectionGate:
    """Admits TCP connections under the caps on handshakes in progress, and counts what the
    connection layer reports: TLS failures, clients that do not read, accept errors."""

    def __init__(
        self,
        *,
        counters: Counters,
        max_pending_handshakes: int,
        max_pending_handshakes_per_ip: int,
        max_write_buffer_bytes: int,
    ) -> None:
        self.counters = counters
        self.max_pending_handshakes = max_pending_handshakes
        self.max_pending_handshakes_per_ip = max_pending_handshakes_per_ip
        self.max_write_buffer_bytes = max_write_buffer_bytes
        self.pending = 0
        self.pending_per_ip: Counter[str] = Counter()
        self._log = RateLimitedLog(logger)

    def admit(self, ip: str) -> PendingHandshake | None:
        """At accept: a handshake in progress (``release()`` it once over), or None past a cap
        (then close the connection)."""
        if self.pending >= self.max_pending_handshakes:
            self._refuse("pending_limit", ip)
            return None
        if self.pending_per_ip[ip] >= self.max_pending_handshakes_per_ip:
            self._refuse("pending_ip_limit", ip)
            return None
        self.pending += 1
        self.pending_per_ip[ip] += 1
        return PendingHandshake(self, ip)

    def closed(self) -> None:
        """An admitted connection is closed (the memory trim counts them)."""
        self.counters.add(Count.CONNECTIONS_CLOSED)

    def _over(self, ip: str) -> None:
        self.pending -= 1
        self.pending_per_ip[ip] -= 1
        if not self.pending_per_ip[ip]:
            del self.pending_per_ip[ip]

    def _refuse(self, reason: str, ip: str) -> None:
        self.counters.add(Count.CONNECTIONS_REFUSED, reason)
        self._log.log(
            logging.WARNING,
            reason,
            "refused a connection from %s at accept: %d handshakes in progress (%d from it)",
            ip,
            self.pending,
            self.pending_per_ip[ip],
        )

    def tls_failed(self, ip: str, exc: BaseException) -> None:
        """Count a failed TLS handshake; plain HTTP to the TLS port gets a WARNING line."""
        reason = tls_failure_reason(exc)
        self.counters.add(Count.TLS_HANDSHAKE_FAILURES, reason)
        if reason == "plain_http":
            self._log.log(
                logging.WARNING,
                reason,
                "plain HTTP from %s to the TLS port: use https:// or wss://",
                ip,
            )
        else:
            self._log.log(logging.INFO, reason, "TLS handshake from %s failed (%s)", ip, reason)

    def write_overflow(self, ip: str, *, buffered_bytes: int) -> None:
        """Count and log a connection aborted for not reading what we send it."""
        self.counters.add(Count.WRITE_BUFFER_OVERFLOWS)
        self._log.log(
            logging.WARNING,
            "write_overflow",
            "aborted the connection of %s: %d bytes unsent (limit %d), the client does not read",
            ip,
            buffered_bytes,
            self.max_write_buffer_bytes,
        )

    def bad_request(self, ip: str, *, reason: str, detail: str) -> None:
        """Count and log an HTTP request refused with 4xx before routing."""
        self.counters.add(Count.BAD_REQUESTS, reason)
        self._log.log(
            logging.WARNING,
            f"bad_request_{reason}",
            "bad HTTP request from %s (%s): %s",
            ip,
            reason,
            shorten(detail, 120),
        )

    def accept_failed(self, exc: OSError) -> None:
        """Count an accept() failure (out of fds) with a rate-limited ERROR line."""
        name = errno.errorcode.get(exc.errno or 0, "other")
        self.counters.add(Count.ACCEPT_ERRORS, name)
        self._log.log(
            logging.ERROR,
            f"accept_{name}",
            "cannot accept connections: %s (raise the fd limit or lower RECEIVER_MAX_STREAMS)",
            exc.strerror or name,
        )
