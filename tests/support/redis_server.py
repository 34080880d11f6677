"""A real ``redis-server`` for the tests, and the ``receiver consume`` process that reads it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from receiver.settings import Settings
from receiver.sinks.redis import RedisSinks
from tests.support.commands import free_port


class RedisServer:
    """``redis-server`` on a free loopback port, in memory only, its files in ``directory``."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        """``persistent``: an append-only file synced on every write, so a restart keeps data."""
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(
                "redis-server is needed by tests/test_redis.py (apt-get install redis-server)"
            )
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / "redis.log"
        self.argv = [
            executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if persistent else "no",
            "--appendfsync", "always",
            "--dir", str(directory),
        ]  # fmt: skip
        self._launch()

    def _launch(self) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def restart(self) -> None:
        """Start the server again on the same port (after ``stop``)."""
        self._launch()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        with self.client() as client:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start: {self.log.read_text()}")
                time.sleep(0.02)

    def pause(self) -> None:
        """Freeze the server (it accepts connections but answers nothing): a slow Redis."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class OverlaidRedisSinks(RedisSinks):
    """The ``redis`` entry point with some settings of its own (unvalidated, as a user's
    environment may hold them): each test its Redis and prefix, on the receiver's settings."""

    def __init__(self, **overrides: Any) -> None:
        super().__init__()
        self.overrides = overrides

    async def start(self, settings: Settings, *, registry: CollectorRegistry) -> None:
        await super().start(settings.model_copy(update=self.overrides), registry=registry)

    def __call__(self, settings: Settings) -> Any:
        return super().__call__(settings.model_copy(update=self.overrides))


def redis_factory(url: str, prefix: str, **settings: Any) -> OverlaidRedisSinks:
    """A ``redis`` sink factory on ``url`` and ``prefix`` (and other ``redis_*`` settings)."""
    return OverlaidRedisSinks(redis_url=SecretStr(url), redis_prefix=prefix, **settings)


def consume_cmd(url: str, prefix: str, *args: str | Path) -> list[str]:
    """``receiver consume`` as its own process."""
    return [
        sys.executable,
        "-m",
        "receiver",
        "consume",
        "--url",
        url,
        "--prefix",
        prefix,
        "--block-ms",
        "100",
        *(str(a) for a in args),
    ]


class ConsumeProcess:
    """A running ``receiver consume``; ``finish`` waits for it and returns its output."""

    def __init__(self, cwd: Path, argv: list[str]) -> None:
        self.stdout = cwd / f"consume-{len(list(cwd.glob('consume-*.out')))}.out"
        self.stderr = self.stdout.with_suffix(".err")
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err)

    def finish(self, *, timeout_s: float = 60) -> str:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"consume did not finish: {self.output()}") from None
        assert code == 0, f"consume exited with {code}: {self.output()}"
        return self.stdout.read_text()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        return self.stdout.read_text()

    def output(self) -> str:
        return f"stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()}"
