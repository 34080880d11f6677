"""The receiver as a `receiver serve` subprocess, measured through /proc: the soak and the chaos
tests run it so (the chaos server with uvloop, a lower fd limit and a higher CPU priority)."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.support.commands import env_with, receiver_cmd
from tests.support.receiver import TOKEN, TlsFiles
from tests.support.waits import wait_until
from tests.support.wire import HOST

# ---------------------------------------------------------------------------------------------
# Measuring a process through /proc


@dataclass(frozen=True)
class ProcFigures:
    """What a process holds: file descriptors by kind, resident memory, threads."""

    fds: int
    open_files: int  # regular files (WAVs, stream.json, logs)
    sockets: int
    rss_kib: int
    threads: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def fd_targets(pid: int | str = "self") -> list[str]:
    """Where each open descriptor of ``pid`` points (``socket:[…]``, a path, ``pipe:[…]``)."""
    root = Path(f"/proc/{pid}/fd")
    targets = []
    for entry in root.iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            targets.append(os.readlink(entry))
    return targets


def proc_figures(pid: int | str = "self") -> ProcFigures:
    """fds, regular files, sockets (from /proc/<pid>/fd), VmRSS and Threads (status)."""
    targets = fd_targets(pid)
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return ProcFigures(
        fds=len(targets),
        open_files=sum(1 for t in targets if t.startswith("/") and not t.startswith("/dev/")),
        sockets=sum(1 for t in targets if t.startswith("socket:")),
        rss_kib=int(status["VmRSS"].split()[0]),
        threads=int(status["Threads"].strip()),
    )


# ---------------------------------------------------------------------------------------------
# The receiver in a subprocess


# Test instrumentation put into the server process (a sitecustomize on its PYTHONPATH; the
# receiver is not changed): SIGUSR2 runs a full garbage collection and appends how many objects
# it freed to $SOAK_GC_ACK. It tells memory that is still referenced (a leak) from garbage in
# reference cycles waiting for the collector: CPython before 3.11.8 / 3.12.2 keeps every
# asyncio SSLProtocol whose TLS handshake failed, with its 256 KiB read buffer, in such a
# cycle (python/cpython#109534), which a full collection frees.
GC_HOOK = """\
import gc, os, signal

def _collect(signum, frame):
    freed = gc.collect()
    with open(os.environ["SOAK_GC_ACK"], "a") as ack:
        ack.write(f"{freed}\\n")

signal.signal(signal.SIGUSR2, _collect)
"""


# serve's start-up line: "listening on wss://127.0.0.1:8443/ (health: …"
LISTENING = re.compile(r"listening on wss?://\S+:(\d+)/ ")


class ServerProcess:
    """`python -m receiver serve` on a port the kernel picks when it binds (RECEIVER_PORT=0:
    a port found free beforehand can be taken before the server binds it, which failed a CI
    run), known from the start-up line; on 127.0.0.1 unless ``env`` says otherwise, its log in
    a file; ``env`` over this process's environment without RECEIVER_* variables, a
    drain timeout of 1 s and the web page off (unless ``env`` says otherwise). ``gc_hook``
    puts in the SIGUSR2 garbage collection above (``collect_garbage``)."""

    def __init__(
        self,
        cwd: Path,
        env: dict[str, str],
        *,
        preexec_fn: Callable[[], None] | None = None,
        gc_hook: bool = False,
    ) -> None:
        self._port: int | None = None
        self.cwd = cwd
        self.log = cwd / "serve.log"
        defaults = {"RECEIVER_HOST": HOST, "RECEIVER_DRAIN_TIMEOUT_S": "1"}
        self.env = env_with(**{**defaults, **env, "RECEIVER_PORT": "0"})
        self.gc_ack = cwd / "gc-ack"
        if gc_hook:
            hook = cwd / "gc-hook"
            hook.mkdir(exist_ok=True)
            (hook / "sitecustomize.py").write_text(GC_HOOK)
            self.gc_ack.write_text("")
            self.env["PYTHONPATH"] = os.pathsep.join(
                [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
            self.env["SOAK_GC_ACK"] = str(self.gc_ack)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                receiver_cmd("serve"),
                cwd=cwd,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=preexec_fn,  # only setrlimit (server_preexec)
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        """The stream port, known once ``wait_listening`` has read the start-up line."""
        assert self._port is not None, "wait_listening() first: the server picks its port"
        return self._port

    def wait_listening(self, timeout_s: float = 30.0) -> str:
        """The log once the server says it listens (another process: polled every 50 ms); from
        then on ``port`` and ``env``'s RECEIVER_PORT are the port it bound."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if found := LISTENING.search(text):
                self._port = int(found[1])
                self.env["RECEIVER_PORT"] = found[1]
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"receiver exited: {self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"receiver not listening after {timeout_s} s: {self.log.read_text()}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit within 30 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=30)

    def figures(self) -> ProcFigures:
        return proc_figures(self.pid)

    async def collect_garbage(self) -> int:
        """Have the server run a full garbage collection; how many objects it freed."""
        done = len(self.gc_ack.read_text().splitlines())
        self.proc.send_signal(signal.SIGUSR2)
        assert await wait_until(lambda: len(self.gc_ack.read_text().splitlines()) > done, 10), (
            "the server did not run its garbage collection"
        )
        return int(self.gc_ack.read_text().splitlines()[-1])


@contextlib.contextmanager
def server_process(cwd: Path, env: dict[str, str]) -> Iterator[ServerProcess]:
    """A listening receiver subprocess, always stopped (killed if need be) afterwards."""
    server = ServerProcess(cwd, env, gc_hook=True)
    try:
        server.wait_listening()
        yield server
    finally:
        server.stop()


def log_problems(text: str) -> list[str]:
    """Log lines that mean something went wrong inside the server (not a client's fault)."""
    marks = ("Traceback", "internal error", "connection handler failed", "Exception in callback")
    marks += ("Task was destroyed", "never retrieved", "Unclosed", "ResourceWarning")
    return [line for line in text.splitlines() if any(m in line for m in marks)]


# ---------------------------------------------------------------------------------------------
# The chaos server


# The server and the good stream run at a higher CPU priority than the attackers (when allowed:
# root), so that other load on the machine does not pass for a freeze of the server's loop.
PRIORITY = -10


def raise_priority() -> None:
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)


def server_preexec(nofile: int | None) -> Callable[[], None]:
    """A preexec_fn for the server: a higher priority, and RLIMIT_NOFILE ``nofile`` (soft and
    hard) when given."""

    def apply() -> None:
        raise_priority()
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return apply


@contextlib.contextmanager
def chaos_server(
    root: Path,
    tls_files: TlsFiles,
    *,
    nofile: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """`receiver serve` on uvloop with the test certificate and token, recordings under root."""
    recordings = root / "recordings"
    recordings.mkdir(exist_ok=True)
    values = {
        "RECEIVER_TOKENS": TOKEN,
        "RECEIVER_TLS_CERT": str(tls_files.cert),
        "RECEIVER_TLS_KEY": str(tls_files.key),
        "RECEIVER_RECORDINGS_DIR": str(recordings),
        "RECEIVER_EVENT_LOOP": "uvloop",
        "RECEIVER_DRAIN_TIMEOUT_S": "1",
        # The web page's fixed port (8080) would collide with any other receiver running here;
        # it is not what these attacks aim at.
        "RECEIVER_UI_PORT": "",
        **(env or {}),
    }
    server = ServerProcess(root, values, preexec_fn=server_preexec(nofile), gc_hook=True)
    try:
        server.wait_listening()
        yield server
    finally:
        server.stop()
