"""The command line as people run it: `receiver serve`, `simulate`, `health` in subprocesses."""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.support.audio import run
from tests.support.commands import env_with, free_port, receiver_cmd, run_receiver


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RECEIVER_PORT", "99999"),
        ("RECEIVER_PORT", "eighty"),
        ("RECEIVER_L16_BYTE_ORDER", "middle"),
        ("RECEIVER_TOKENS", "short"),
        ("RECEIVER_MAX_STREAMS", "0"),
        ("RECEIVER_SINKS", "nonexistent"),
    ],
)
def test_invalid_setting_is_one_line_naming_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    """An invalid setting stops `serve` with exit 2 and one line that names the variable."""
    result = run_receiver("serve", cwd=tmp_path, env=env_with(**{variable: value}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "short" not in lines[0] or variable != "RECEIVER_TOKENS"  # tokens are never echoed
    assert not (tmp_path / "recordings").exists() or variable == "RECEIVER_SINKS"


def test_unwritable_recordings_dir_exits_2(tmp_path: Path) -> None:
    """A recordings dir that cannot be created stops start-up with one clear line."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_receiver(
        "serve", "--recordings-dir", str(blocker / "recordings"), cwd=tmp_path, env=env_with()
    )
    assert result.returncode == 2
    assert "RECEIVER_RECORDINGS_DIR" in result.stderr


def test_serve_on_defaults_then_simulate_then_sigterm(served: Any, tmp_path: Path) -> None:
    """`serve` with no token or certificate prints a token and makes a dev certificate; the
    simulator records through it; `health` says 200; SIGTERM exits 0 with files finished."""
    server = served()
    log = server.wait_listening()
    match = re.search(r"bearer token.*:\n\n    (\S+)\n", log)
    assert match, log
    token = match.group(1)
    assert "DEVELOPMENT certificate" in log
    assert re.search(r"SHA-256 ([0-9A-F]{2}:){31}[0-9A-F]{2}", log)
    assert (tmp_path / ".receiver" / "dev-cert.pem").is_file()

    health = run_receiver("health", cwd=tmp_path, env=server.env)
    assert health.returncode == 0, health.stderr

    tone = tmp_path / "tone.wav"
    run("sox", "-n", "-r", "8000", "-c", "1", "-b", "16", tone, "synth", "1", "sine", "440")
    sim = run_receiver(
        "simulate",
        str(tone),
        str(tone),
        "--token",
        token,
        "--url",
        f"wss://localhost:{server.port}/calls/1",
        "--param",
        "room=42",
        "--stream-sid",
        "cli-sim",
        cwd=tmp_path,
        env=server.env,
    )
    assert sim.returncode == 0, sim.stdout + sim.stderr
    assert "1000" in sim.stdout
    assert server.stop() == 0
    directory = tmp_path / "recordings" / "cli-sim"
    for track in ("inbound", "outbound"):
        data, rate = soundfile.read(directory / f"{track}.wav", dtype="int16")
        assert rate == 8000 and len(data) == 8000
        assert np.abs(data).max() > 1000
    final_log = server.log.read_text()
    assert token not in final_log.replace(match.group(0), "")  # printed once, never logged


def test_simulate_without_token_is_refused(tmp_path: Path) -> None:
    """The simulator asks for a token instead of connecting without one."""
    tone = tmp_path / "tone.wav"
    run("sox", "-n", "-r", "8000", "-c", "1", "-b", "16", tone, "synth", "0.1", "sine", "440")
    result = run_receiver("simulate", str(tone), cwd=tmp_path, env=env_with())
    assert result.returncode == 2
    assert "--token" in result.stderr


def test_simulate_refuses_wrong_rate_with_a_sox_hint(tmp_path: Path) -> None:
    """A WAV at the wrong rate is refused with the sox command that converts it."""
    tone = tmp_path / "tone.wav"
    run("sox", "-n", "-r", "44100", "-c", "1", "-b", "16", tone, "synth", "0.1", "sine", "440")
    result = run_receiver("simulate", str(tone), "--token", "x" * 20, cwd=tmp_path, env=env_with())
    assert result.returncode == 2
    assert "44100" in result.stderr and "sox" in result.stderr


def test_insecure_ws_says_so(served: Any) -> None:
    """RECEIVER_INSECURE_WS serves ws:// and warns about it."""
    server = served(RECEIVER_INSECURE_WS="true", RECEIVER_TOKENS="t" * 20)
    log = server.wait_listening()
    assert "PLAIN ws://" in log
    assert "listening on ws://" in log
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("choice", "loop"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_event_loop_setting(served: Any, choice: str, loop: str) -> None:
    """`serve` runs on uvloop when it is installed (the [dev] extras install it), or on
    asyncio's loop when RECEIVER_EVENT_LOOP=asyncio, and says which."""
    server = served(RECEIVER_EVENT_LOOP=choice, RECEIVER_INSECURE_WS="true")
    assert f"{loop} loop" in server.wait_listening()
    assert server.stop() == 0


def test_json_logs_carry_the_stream_sid(served: Any, tmp_path: Path, tls_files: Any) -> None:
    """With RECEIVER_LOG_FORMAT=json every line is JSON; stream lines carry stream_sid, and the
    last one says where the files are."""
    server = served(
        RECEIVER_LOG_FORMAT="json",
        RECEIVER_TOKENS="t" * 20,
        RECEIVER_TLS_CERT=str(tls_files.cert),
        RECEIVER_TLS_KEY=str(tls_files.key),
    )
    server.wait_listening()
    tone = tmp_path / "tone.wav"
    run("sox", "-n", "-r", "8000", "-c", "1", "-b", "16", tone, "synth", "0.5", "sine", "440")
    sim = run_receiver(
        "simulate",
        str(tone),
        "--token",
        "t" * 20,
        "--stream-sid",
        "json-sid",
        "--url",
        f"wss://localhost:{server.port}/",
        "--cafile",
        str(tls_files.cert),
        cwd=tmp_path,
        env=server.env,
    )
    assert sim.returncode == 0, sim.stderr
    assert server.stop() == 0
    entries = [json.loads(line) for line in server.log.read_text().splitlines()]
    about = [e for e in entries if e.get("stream_sid") == "json-sid"]
    assert any("stream started" in e["message"] for e in about)
    last = [e for e in about if "stream ended" in e["message"]]
    assert len(last) == 1
    assert "stream ended (stop)" in last[0]["message"]
    assert "recordings/json-sid" in last[0]["message"]
    assert {"time", "level", "logger", "message"} <= set(entries[0])


def test_simulate_shows_progress_on_a_terminal(served: Any, tmp_path: Path, tls_files: Any) -> None:
    """On a terminal, `simulate` draws a progress bar that reaches 100%."""
    import pty

    server = served(
        RECEIVER_TOKENS="t" * 20,
        RECEIVER_TLS_CERT=str(tls_files.cert),
        RECEIVER_TLS_KEY=str(tls_files.key),
    )
    server.wait_listening()
    tone = tmp_path / "tone.wav"
    run("sox", "-n", "-r", "8000", "-c", "1", "-b", "16", tone, "synth", "2", "sine", "440")
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        receiver_cmd(
            "simulate",
            str(tone),
            "--token",
            "t" * 20,
            "--cafile",
            str(tls_files.cert),
            "--url",
            f"wss://localhost:{server.port}/",
        ),
        env=server.env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=child_fd,
    )
    os.close(child_fd)
    output = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(main_fd)
    assert proc.wait(timeout=60) == 0
    text = output.decode()
    assert "100%" in text and "2.0 / 2.0 s" in text
    assert "[" + "#" * 30 + "]" in text
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------------
# As a newcomer finds it (issue 12): errors, help and defaults of every command.

ROOT = Path(__file__).parent.parent


def tone_wav(path: Path, seconds: float, *, rate: int = 8000, channels: int = 1) -> Path:
    """A sine tone made with sox."""
    run("sox", "-n", "-r", rate, "-c", channels, "-b", "16", path, "synth", seconds, "sine", "440")
    return path


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The only line of stderr (a traceback, or several lines, fail the test)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_help_reads_as_a_newcomer_needs(tmp_path: Path) -> None:
    """`receiver --help` names every command in plain words; every option of every command
    has help, defaults are shown; `serve --help` names RECEIVER_TOKENS."""
    from receiver.cli import build_parser

    top = run_receiver("--help", cwd=tmp_path)
    assert top.returncode == 0
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"serve", "repair", "health", "simulate", "streams", "consume"} <= set(commands)
    for command in commands:
        assert re.search(rf"^\s+{command}\s+\S", top.stdout, re.M), top.stdout
    assert "``" not in top.stdout and "composition root" not in top.stdout
    simulate = run_receiver("simulate", "--help", cwd=tmp_path).stdout
    assert "(default: pcmu)" in simulate and "(default: signalwire)" in simulate
    assert "(default: 20)" in simulate
    serve = run_receiver("serve", "--help", cwd=tmp_path).stdout
    assert "RECEIVER_TOKENS" in serve

    def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    for parser in parsers(build_parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                assert action.help, f"{parser.prog} {action.option_strings or action.dest}"


def test_simulate_finds_the_receiver_from_its_settings(served: Any, tmp_path: Path) -> None:
    """Without --url, `simulate` plays into the receiver RECEIVER_HOST/RECEIVER_PORT name."""
    server = served(RECEIVER_TOKENS="t" * 20)
    server.wait_listening()
    tone = tone_wav(tmp_path / "tone.wav", 0.2)
    sim = run_receiver(
        "simulate", str(tone), "--stream-sid", "by-port", cwd=tmp_path, env=server.env
    )
    assert sim.returncode == 0, sim.stderr
    assert f"wss://localhost:{server.port}/" in sim.stdout
    assert server.stop() == 0
    assert (tmp_path / "recordings" / "by-port" / "inbound.wav").is_file()


def test_simulate_failures_are_one_line_with_the_right_exit_code(
    served: Any, tmp_path: Path, tls_files: Any
) -> None:
    """Each way `simulate` can fail is one line on stderr, no traceback: exit 2 for usage
    (a URL that is not ws(s)://, --frame-ms 0, a missing or stereo WAV), 1 at run time (a
    wrong token, ws:// to the TLS port, nothing listening, an untrusted certificate)."""
    server = served(
        RECEIVER_TOKENS="t" * 20,
        RECEIVER_TLS_CERT=str(tls_files.cert),
        RECEIVER_TLS_KEY=str(tls_files.key),
    )
    server.wait_listening()
    tone = tone_wav(tmp_path / "tone.wav", 0.1)
    stereo = tone_wav(tmp_path / "stereo.wav", 0.1, channels=2)
    port = server.port
    trusted = ["--cafile", str(tls_files.cert)]
    cases: list[tuple[list[str], int, str]] = [
        ([str(tone), "--url", f"https://localhost:{port}/", *trusted], 2, "wss://"),
        ([str(tone), "--frame-ms", "0", *trusted], 2, "--frame-ms"),
        ([str(tmp_path / "missing.wav"), *trusted], 2, "no such file"),
        ([str(stereo), *trusted], 2, "remix 1"),
        ([str(tone), "--token", "w" * 20, *trusted], 1, "401"),
        ([str(tone), "--url", f"ws://localhost:{port}/", *trusted], 1, "wss://"),
        ([str(tone), "--url", f"wss://localhost:{free_port()}/", *trusted], 1, "nothing listens"),
        ([str(tone)], 1, "--cafile"),
    ]
    for args, code, words in cases:
        result = run_receiver("simulate", *args, cwd=tmp_path, env=server.env)
        line = one_line(result)
        assert result.returncode == code, (args, line)
        assert words in line, (args, line)
        assert "t" * 20 not in line
    assert server.stop() == 0


def test_simulate_realtime_keeps_time_after_the_shorter_track(served: Any, tmp_path: Path) -> None:
    """`--realtime` with a 1 s track and a 0.1 s one takes 1 s of the receiver's clock (it took
    0.55 s: pacing counted messages, two a frame, also after the short track had ended)."""
    # Reads on arrival: coalesced reads would move started_at and ended_at by up to an interval.
    server = served(RECEIVER_TOKENS="t" * 20, RECEIVER_READ_INTERVAL_MS="0")
    server.wait_listening()
    long = tone_wav(tmp_path / "long.wav", 1.0)
    short = tone_wav(tmp_path / "short.wav", 0.1)
    args = ["simulate", str(long), str(short), "--realtime", "--stream-sid", "paced"]
    args += ["--url", f"wss://localhost:{server.port}/"]
    sim = run_receiver(*args, cwd=tmp_path, env=server.env)
    assert sim.returncode == 0, sim.stderr
    assert server.stop() == 0
    record = json.loads((tmp_path / "recordings" / "paced" / "stream.json").read_text())
    started, ended = (datetime.fromisoformat(record[k]) for k in ("started_at", "ended_at"))
    # A lower bound only: a loaded machine makes it slower, never faster.
    took_s = (ended - started).total_seconds()
    assert took_s >= 0.95, f"1 s of audio played in {took_s:.2f} s"


def test_health_probes_the_address_the_receiver_binds(served: Any, tmp_path: Path) -> None:
    """`health` probes RECEIVER_HOST (here 127.0.0.2), not always 127.0.0.1."""
    server = served(RECEIVER_TOKENS="t" * 20, RECEIVER_HOST="127.0.0.2")
    server.wait_listening()
    health = run_receiver("health", cwd=tmp_path, env=server.env)
    assert health.returncode == 0, health.stderr
    assert f"127.0.0.2:{server.port}: 200" in health.stdout
    assert server.stop() == 0


def test_swapped_certificate_and_key_say_so(tmp_path: Path, tls_files: Any) -> None:
    """RECEIVER_TLS_CERT and RECEIVER_TLS_KEY given the other way round: one line saying so,
    exit 2 (it was OpenSSL's "[SSL] PEM lib")."""
    env = env_with(
        RECEIVER_TOKENS="t" * 20,
        RECEIVER_TLS_CERT=str(tls_files.key),
        RECEIVER_TLS_KEY=str(tls_files.cert),
        RECEIVER_PORT=str(free_port()),
    )
    result = run_receiver("serve", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "swapped" in one_line(result)


def test_vad_example_creates_the_recordings_directory(tmp_path: Path, tls_files: Any) -> None:
    """examples/vad.py records into a recordings directory that does not exist yet and prints
    the speech it heard."""
    recordings = tmp_path / "new" / "recordings"
    port = free_port()
    env = env_with(
        RECEIVER_TOKENS="t" * 20,
        RECEIVER_TLS_CERT=str(tls_files.cert),
        RECEIVER_TLS_KEY=str(tls_files.key),
        RECEIVER_HOST="127.0.0.1",
        RECEIVER_PORT=str(port),
        RECEIVER_RECORDINGS_DIR=str(recordings),
    )
    with (
        (tmp_path / "vad.log").open("w") as log,
        subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "vad.py")],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        ) as vad,
    ):
        assert vad.stdout is not None

        def line(timeout_s: float = 30) -> str:
            """vad.py's next line of output, or "" when none comes in time."""
            ready, _, _ = select.select([vad.stdout], [], [], timeout_s)
            return vad.stdout.readline() if ready else ""  # type: ignore[union-attr]

        try:
            assert "listening" in line(), (tmp_path / "vad.log").read_text()
            tone = tone_wav(tmp_path / "tone.wav", 1.0)
            sim = run_receiver(
                *("simulate", str(tone), "--stream-sid", "vad", "--cafile", str(tls_files.cert)),
                cwd=tmp_path,
                env=env,
            )
            assert sim.returncode == 0, sim.stderr
            assert "inbound speech" in line()
        finally:
            vad.terminate()
    assert (recordings / "vad" / "inbound.wav").is_file()


def test_credentials_of_a_new_clone_stay_out_of_git() -> None:
    """`.receiver/` (the development key) is ignored by git; the README explains the
    recordings directory's `.in-progress/`."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".receiver/dev-key.pem"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0
    assert ".in-progress/" in (ROOT / "README.md").read_text()


def test_readme_docker_run_can_write_its_recordings() -> None:
    """The README's `docker run` with a bind-mounted recordings directory says how the
    image's user (uid 10001) gets to write there: chown, or --user with its own volumes."""
    readme = (ROOT / "README.md").read_text()
    production = readme[readme.index("## Production") :]
    assert 'docker run -p 8443:8443 -e RECEIVER_TOKENS=… -v "$PWD/recordings:/recordings"' in (
        production
    )
    assert "sudo chown 10001 recordings" in production
    assert '--user "$(id -u)"' in production and '-v "$PWD/state:/state"' in production
