"""The pytest options and the shared fixtures: real test audio (espeak-ng + sox), a TLS
certificate for the session, and real receivers on loopback port 0 writing under ``tmp_path``.
Plain helpers live in tests/support/."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from receiver import tls
from receiver.server import Receiver
from tests.support.audio import Speech, run
from tests.support.options import LONG_RUNS, LongRuns
from tests.support.receiver import StartReceiver, TlsFiles, make_settings
from tests.support.server_process import ServerProcess

SENTENCES = {
    "inbound": "The quick brown fox jumps over the lazy dog. Seven silver swans swam south.",
    "outbound": "Thank you for calling. Your conference is being recorded for quality.",
}


# The in-process end-to-end tests run on both loops the receiver serves on: asyncio's, and
# uvloop (what `receiver serve` picks when installed); their transports differ in what the
# connection layer leans on (pausing, half-closes, write buffers).
BOTH_LOOPS_MODULES = frozenset({"tests.test_e2e", "tests.test_shell_limits", "tests.test_limits"})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    if module is None or module.__name__ not in BOTH_LOOPS_MODULES:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--screenshots DIR``: where tests/test_web.py saves the web page's screenshots.
    ``--chaos-long``, ``--chaos-report FILE``: tests/test_chaos.py at the issue's sizes (what
    `bash scripts/chaos` runs), each attack's figures collected in FILE. ``--fuzz-*`` and
    ``--soak-*``: the sizes of tests/test_fuzz_*.py and tests/test_soak.py (``LongRuns``)."""
    parser.addoption(
        "--screenshots",
        metavar="DIR",
        default=None,
        help="save the web page's screenshots to DIR (docs to update the README's)",
    )
    chaos = parser.getgroup("chaos", "the chaos suite (tests/test_chaos.py)")
    chaos.addoption("--chaos-long", action="store_true", help="run each attack at its full size")
    chaos.addoption("--chaos-report", default=None, help="append each attack's figures here")
    group = parser.getgroup("receiver", "the long runs of tests/test_fuzz_*.py and test_soak.py")
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


@pytest.fixture(autouse=True)
def _properties_only_when_fuzzing(request: pytest.FixtureRequest) -> None:
    """Under scripts/fuzz, only the properties of tests/test_fuzz_*.py run: their fixed cases
    run in the normal suite."""
    fuzzing = request.module.__name__.startswith("tests.test_fuzz_")
    if LONG_RUNS.fuzz_examples and fuzzing and not hasattr(request.function, "hypothesis"):
        pytest.skip("not a property: runs in the normal suite")


@pytest.fixture(scope="session", autouse=True)
def _fuzz_report() -> Iterator[None]:
    """Write the measured fuzz case counts for scripts/fuzz once the session is done."""
    yield
    if LONG_RUNS.fuzz_report:
        from tests.support.fuzzing import write_report

        write_report(Path(LONG_RUNS.fuzz_report))


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


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Any]:
    """Start `receiver serve` subprocesses in tmp_path; any still running is killed after."""
    started: list[ServerProcess] = []

    def start(*, preexec_fn: Callable[[], None] | None = None, **env: str) -> ServerProcess:
        s = ServerProcess(tmp_path, env, preexec_fn=preexec_fn)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
