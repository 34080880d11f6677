"""The ``receiver`` command in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def receiver_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "receiver", *args]


def env_with(**values: str) -> dict[str, str]:
    """This process's environment without RECEIVER_* variables, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    env["RECEIVER_UI_PORT"] = ""  # the web page is off unless a test turns it on
    env.update(values)
    return env


def run_receiver(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m receiver ARGS` as a user runs it; output captured, exit code not checked."""
    return subprocess.run(
        receiver_cmd(*args),
        env=env if env is not None else env_with(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
