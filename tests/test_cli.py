"""The command line as people run it: `receiver serve`, `simulate`, `health` in subprocesses."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.conftest import env_with, receiver_cmd, run, run_receiver


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
    import json

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
