"""Shared fixtures: real test audio (espeak-ng + sox), a TLS certificate for the session, and
real receivers on loopback port 0 writing under ``tmp_path``."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from numpy.typing import NDArray

from receiver import tls
from receiver.server import Receiver
from receiver.settings import Settings

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "rotated-token-abcdef0123456789"

SENTENCES = {
    "inbound": "The quick brown fox jumps over the lazy dog. Seven silver swans swam south.",
    "outbound": "Thank you for calling. Your conference is being recorded for quality.",
}


@dataclass
class LongRuns:
    """Sizes of the long runs, from pytest options (``scripts/fuzz`` and ``scripts/soak`` pass
    them); the defaults are the suite's short versions. Set in ``pytest_configure``, before any
    test module is imported, so that test modules may size their decorators from them."""

    fuzz_examples: int = 0
    fuzz_report: str | None = None
    soak_connections: int = 100
    soak_seed: int = 20241125
    soak_report: str | None = None


LONG_RUNS = LongRuns()


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--screenshots DIR``: where tests/test_web.py saves the web page's screenshots.
    ``--chaos-long``, ``--chaos-report FILE``: tests/test_chaos.py at the issue's sizes (what
    `bash scripts/chaos` runs), each attack's figures collected in FILE. ``--fuzz-*`` and
    ``--soak-*``: the sizes of tests/test_fuzz.py and tests/test_soak.py (``LongRuns``)."""
    parser.addoption(
        "--screenshots",
        metavar="DIR",
        default=None,
        help="save the web page's screenshots to DIR (docs to update the README's)",
    )
    chaos = parser.getgroup("chaos", "the chaos suite (tests/test_chaos.py)")
    chaos.addoption("--chaos-long", action="store_true", help="run each attack at its full size")
    chaos.addoption("--chaos-report", default=None, help="append each attack's figures here")
    group = parser.getgroup("receiver", "the long runs of tests/test_fuzz.py and test_soak.py")
    group.addoption(
        "--fuzz-examples",
        type=int,
        default=LongRuns.fuzz_examples,
        help="generated cases in total over every property, and only the properties run "
        "(default 0: a few hundred cases each, with the fixed cases)",
    )
    group.addoption("--fuzz-report", help="write the cases run, counted, to this JSON file")
    group.addoption(
        "--soak-connections",
        type=int,
        default=LongRuns.soak_connections,
        help="connections the soak opens and cuts (default %(default)s)",
    )
    group.addoption(
        "--soak-seed",
        type=int,
        default=LongRuns.soak_seed,
        help="seed of the soak's choices, to replay a run (default %(default)s)",
    )
    group.addoption("--soak-report", help="write the soak's before/after figures to this file")


def pytest_configure(config: pytest.Config) -> None:
    LONG_RUNS.fuzz_examples = config.getoption("--fuzz-examples")
    LONG_RUNS.fuzz_report = config.getoption("--fuzz-report")
    LONG_RUNS.soak_connections = config.getoption("--soak-connections")
    LONG_RUNS.soak_seed = config.getoption("--soak-seed")
    LONG_RUNS.soak_report = config.getoption("--soak-report")


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RECEIVER_* or SIGNALWIRE_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("RECEIVER_", "SIGNALWIRE_")):
            monkeypatch.delenv(name)


def run(*argv: str | Path) -> None:
    """Run a tool (sox, espeak-ng) and fail the test with its stderr if it fails."""
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{argv[0]} failed: {result.stderr}"


@dataclass(frozen=True)
class Speech:
    """Real speech for one track at several rates, made by espeak-ng and resampled by sox."""

    wav: dict[int, Path]

    def samples(self, rate: int) -> NDArray[np.int16]:
        data, file_rate = soundfile.read(self.wav[rate], dtype="int16")
        assert file_rate == rate
        return np.asarray(data, dtype=np.int16)


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Speech]:
    """Two different utterances (one per track) at 8, 16 and 24 kHz, 16-bit mono WAV."""
    for tool in ("espeak-ng", "sox"):
        assert shutil.which(tool), f"{tool} is needed by the tests (bash scripts/test installs it)"
    root = tmp_path_factory.mktemp("speech")
    made: dict[str, Speech] = {}
    for track, sentence in SENTENCES.items():
        raw = root / f"{track}-espeak.wav"
        run("espeak-ng", "-w", raw, sentence)
        wavs = {}
        for rate in (8000, 16000, 24000):
            wavs[rate] = root / f"{track}-{rate}.wav"
            run("sox", raw, "-r", rate, "-c", "1", "-b", "16", "-e", "signed-integer", wavs[rate])
        made[track] = Speech(wavs)
    return made


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate for localhost/127.0.0.1 made for this test session."""
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    tls.write_self_signed(cert, key, dns_names=("localhost",), ips=("127.0.0.1", "::1"))
    return TlsFiles(cert, key)


@pytest.fixture
def client_ssl(tls_files: TlsFiles) -> Any:
    """A client TLS context that trusts only what it must: the test certificate."""
    return tls.client_context(tls_files.cert)


def make_settings(recordings: Path, **overrides: Any) -> Settings:
    """Settings for a test receiver: loopback, port 0, the test token, no .env file."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "tokens": [TOKEN, OTHER_TOKEN],
        "recordings_dir": recordings,
        "drain_timeout_s": 0.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


StartReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def start_receiver(tmp_path: Path, tls_files: TlsFiles) -> AsyncIterator[StartReceiver]:
    """Start real receivers (TLS, port 0, recordings under tmp_path); shut down after the test."""
    started: list[Receiver] = []

    async def start(
        *, tls_on: bool = True, sink_factories: Any = None, **overrides: Any
    ) -> Receiver:
        recordings = overrides.pop("recordings_dir", tmp_path / "recordings")
        recordings.mkdir(parents=True, exist_ok=True)
        settings = make_settings(recordings, **overrides)
        context = tls.server_context(tls_files.cert, tls_files.key) if tls_on else None
        receiver = Receiver(settings, ssl_context=context, sink_factories=sink_factories)
        await receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.shutdown(drain_timeout_s=0)


@pytest.fixture
async def receiver(start_receiver: StartReceiver) -> Receiver:
    """One receiver on its test defaults."""
    return await start_receiver()


def url(receiver: Receiver, path: str = "/media", *, scheme: str = "wss") -> str:
    """The receiver's URL on loopback."""
    return f"{scheme}://localhost:{receiver.port}{path}"


async def wait_idle(receiver: Receiver, *, timeout_s: float = 10.0) -> None:
    """Wait until the receiver has finished every stream (files closed)."""
    async with asyncio.timeout(timeout_s):
        while receiver.active_streams:
            await asyncio.sleep(0.01)


def sox_decode(raw: Path, kind: str, rate: int = 8000) -> NDArray[np.int16]:
    """Decode raw G.711 (``ul``/``al``) with sox: the independent reference decoder."""
    out = raw.with_suffix(".s16")
    run(
        "sox",
        "-t",
        kind,
        "-r",
        rate,
        "-c",
        "1",
        raw,
        "-t",
        "s16",
        "-e",
        "signed-integer",
        "-L",
        out,
    )
    return np.frombuffer(out.read_bytes(), dtype="<i2").astype(np.int16)


def sox_encode(wav: Path, kind: str, out: Path) -> bytes:
    """Encode a WAV to raw ``ul``/``al``/``s16`` with sox: the outside encoder.

    ``-D``: sox dithers by default when it lowers precision (16 bits to G.711's 13-14), which
    would make its output random rather than G.711's one answer per sample.
    """
    extra = ["-e", "signed-integer", "-L"] if kind == "s16" else []
    run("sox", "-D", wav, "-t", kind, *extra, out)
    return out.read_bytes()


def read_wav(path: Path) -> tuple[NDArray[np.int16], int]:
    """A recorded WAV as int16 samples and its rate, read with soundfile."""
    data, rate = soundfile.read(path, dtype="int16")
    return np.asarray(data, dtype=np.int16), int(rate)


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


class Served:
    """A `receiver serve` subprocess on a free port, with its stderr collected to a file."""

    def __init__(
        self, cwd: Path, *, preexec_fn: Callable[[], None] | None = None, **env: str
    ) -> None:
        self.port = free_port()
        self.log = cwd / "serve.log"
        self.cwd = cwd
        defaults = {
            "RECEIVER_PORT": str(self.port),
            "RECEIVER_HOST": "127.0.0.1",
            "RECEIVER_DRAIN_TIMEOUT_S": "1",
        }
        self.env = env_with(**{**defaults, **env})
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                receiver_cmd("serve"),
                cwd=cwd,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=preexec_fn,
            )

    def wait_listening(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if "listening on" in text:
                return text
            assert self.proc.poll() is None, text
            time.sleep(0.05)
        raise AssertionError(self.log.read_text())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Any]:
    """Start `receiver serve` subprocesses in tmp_path; any still running is killed after."""
    started: list[Served] = []

    def start(**env: Any) -> Served:
        s = Served(tmp_path, **env)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
