"""kill -9 mid-stream: the WAV files open in strict readers without repair, hold all but the
last batch, and `receiver repair` finishes them and marks the streams interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import ssl
import subprocess
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from websockets.asyncio.client import connect

from receiver.codecs import CLI_CODECS, codec_for
from receiver.simulate import build_messages
from tests.support.audio import run
from tests.support.commands import env_with, receiver_cmd, run_receiver
from tests.support.http import http_get
from tests.support.receiver import TOKEN, TlsFiles
from tests.support.wire import upgrade_request, ws_frame

PCMU = codec_for(CLI_CODECS["pcmu"])


def read_strict(path: Path) -> NDArray[np.int16]:
    """Samples as Python's wave module reads them: it trusts the header's sizes."""
    with wave.open(str(path)) as w:
        assert (w.getsampwidth(), w.getnchannels(), w.getframerate()) == (2, 1, 8000)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


async def send_burst(url: str, context: ssl.SSLContext, messages: list[str]) -> None:
    """Send a whole stream as fast as possible and keep the connection open."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    ws = await connect(url, ssl=context, additional_headers=headers)
    for message in messages:
        await ws.send(message)
    await asyncio.sleep(60)  # held open until the server dies


async def send_paced(
    url: str, context: ssl.SSLContext, messages: list[str], sent_at: list[float]
) -> None:
    """Send connected+start, then one both-track frame pair every 20 ms, noting each send time."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    ws = await connect(url, ssl=context, additional_headers=headers)
    await ws.send(messages[0])
    await ws.send(messages[1])
    start = time.monotonic()
    media = messages[2:]
    for i in range(0, len(media), 2):
        delay = start + (i // 2) * 0.02 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await ws.send(media[i])
        await ws.send(media[i + 1])
        sent_at.append(time.monotonic())
    await asyncio.sleep(60)


async def test_kill_9_leaves_readable_wavs_and_repair_finishes_them(
    tmp_path: Path, served: Any, tls_files: TlsFiles, client_ssl: ssl.SSLContext, speech: Any
) -> None:
    """After kill -9, >= 99% of a 30 s burst and all paced audio up to 1 s before the kill
    read back sample-exact with `wave`, without repair; repair then marks them interrupted."""
    port_env = {
        "RECEIVER_TOKENS": TOKEN,
        "RECEIVER_TLS_CERT": str(tls_files.cert),
        "RECEIVER_TLS_KEY": str(tls_files.key),
    }
    server = served(**port_env)
    server.wait_listening()
    url = f"wss://localhost:{server.port}/"

    utterance = speech["inbound"].samples(8000)
    burst_audio = np.tile(utterance, int(np.ceil(30 * 8000 / len(utterance))))[: 30 * 8000]
    burst = build_messages(
        codec=PCMU, tracks={"inbound": PCMU.encode(burst_audio)}, stream_sid="burst", stop=False
    )
    paced_audio = {t: np.tile(speech[t].samples(8000), 4)[: 10 * 8000] for t in speech}
    paced = build_messages(
        codec=PCMU,
        tracks={t: PCMU.encode(a) for t, a in paced_audio.items()},
        stream_sid="paced",
        stop=False,
    )
    sent_at: list[float] = []
    tasks = [
        asyncio.create_task(send_burst(url, client_ssl, burst)),
        asyncio.create_task(send_paced(url, client_ssl, paced, sent_at)),
    ]
    await asyncio.sleep(4.0)
    killed_at = time.monotonic()
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    root = tmp_path / "recordings"
    # The burst: 30 s were sent in well under the 4 s before the kill.
    got = read_strict(root / "burst" / "inbound.wav")
    expected = PCMU.decode(PCMU.encode(burst_audio))
    assert len(got) >= 0.99 * len(expected)
    np.testing.assert_array_equal(got, expected[: len(got)])
    share = len(got) / len(expected)
    print(f"burst: {len(got)} of {len(expected)} samples readable by wave ({share:.2%})")
    # The paced stream: everything sent up to 1 s before the kill is readable.
    frames_before = sum(1 for t in sent_at if t <= killed_at - 1.0)
    assert frames_before >= 100
    for track, audio in paced_audio.items():
        got = read_strict(root / "paced" / f"{track}.wav")
        assert len(got) >= frames_before * 160, (track, len(got), frames_before * 160)
        print(
            f"paced {track}: {len(got)} samples readable, {len(sent_at) * 160} sent, "
            f"{frames_before * 160} sent up to 1 s before the kill"
        )
        np.testing.assert_array_equal(got, PCMU.decode(PCMU.encode(audio))[: len(got)])
        sox_samples = subprocess.run(
            ["soxi", "-s", str(root / "paced" / f"{track}.wav")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert int(sox_samples) == len(got)

    # A new server reports the interrupted streams at start-up.
    restarted = served(**port_env)
    log = restarted.wait_listening()
    assert "2 stream(s) were interrupted" in log
    assert restarted.stop() == 0

    result = run_receiver("repair", str(root), cwd=tmp_path, env=env_with())
    assert result.returncode == 0, result.stderr
    assert "2 interrupted stream(s) repaired" in result.stdout
    for sid in ("burst", "paced"):
        record = json.loads((root / sid / "stream.json").read_text())
        assert record["status"] == "interrupted"
        assert record["end"]["kind"] == "interrupted"
        samples = read_strict(root / sid / "inbound.wav")
        assert record["tracks"]["inbound"]["samples"] == len(samples)
    assert not list((root / ".in-progress").iterdir())
    run("sox", root / "paced" / "outbound.wav", "-n", "stat")


async def test_a_client_that_sees_the_end_finds_its_files_complete(
    served: Any, tls_files: TlsFiles, client_ssl: ssl.SSLContext
) -> None:
    """Clients that send their whole stream, stop and close frame included, in one write each
    find both tracks complete the moment the server's end of the connection reaches them:
    the server answers the close only once the files are finished."""
    from websockets.frames import Close, Opcode

    server = served(
        RECEIVER_TOKENS=TOKEN,
        RECEIVER_TLS_CERT=str(tls_files.cert),
        RECEIVER_TLS_KEY=str(tls_files.key),
    )
    server.wait_listening()
    root = server.cwd / "recordings"
    audio = PCMU.encode((np.arange(8000 * 6) % 4000 - 2000).astype(np.int16))
    expected = PCMU.decode(audio)
    close = ws_frame(Close(1000, "").serialize(), opcode=Opcode.CLOSE)

    async def stream(number: int) -> list[int]:
        sid = f"whole-{number}"
        messages = build_messages(
            codec=PCMU, tracks={"inbound": audio, "outbound": audio}, stream_sid=sid
        )
        frames = b"".join(ws_frame(m.encode()) for m in messages)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_ssl, server_hostname="localhost"
        )
        writer.write(upgrade_request("/media", TOKEN))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.write(frames + close)
        await reader.read()  # until the server's end of the connection
        lengths = [len(read_strict(root / sid / f"{t}.wav")) for t in ("inbound", "outbound")]
        writer.close()
        return lengths

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(stream(n) for n in range(20)))
    assert results == [[len(expected)] * 2] * 20
    assert server.stop() == 0


def _file_size_limit(limit_bytes: int) -> Callable[[], None]:
    """A preexec_fn: files of the process can grow to ``limit_bytes``; past it a write fails
    with EFBIG (SIGXFSZ ignored), as on a full disk, without filling one."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return limit


def _files_open_under(pid: int, root: Path) -> list[str]:
    """The files under ``root`` that process ``pid`` holds open."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(link for link in links if link.startswith(str(root)))


async def test_disk_full_at_the_final_stream_json_leaks_nothing_and_repair_finishes_it(
    served: Any, tls_files: TlsFiles, client_ssl: ssl.SSLContext
) -> None:
    """The final stream.json fails to be written (EFBIG): the marker's fd and lock are released,
    no .tmp is left, the failure is logged and counted, and `receiver repair` finishes it."""
    server = served(
        RECEIVER_TOKENS=TOKEN,
        RECEIVER_TLS_CERT=str(tls_files.cert),
        RECEIVER_TLS_KEY=str(tls_files.key),
        preexec_fn=_file_size_limit(256 * 1024),
    )
    server.wait_listening()
    root = server.cwd / "recordings"
    audio = PCMU.encode((np.arange(8000 * 2) % 4000 - 2000).astype(np.int16))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"wss://localhost:{server.port}/"

    async def stream(messages: list[str]) -> None:
        async with connect(url, ssl=client_ssl, additional_headers=headers) as ws:
            for message in messages:
                await ws.send(message)
            await ws.wait_closed()

    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="full")
    # 2,000 marks of 200 characters: a final stream.json of ~500 KB, past the 256 KiB limit.
    marks = [
        json.dumps({"event": "mark", "mark": {"name": f"{i:04}" + "m" * 196}}) for i in range(2000)
    ]
    await stream([*messages[:-1], *marks, messages[-1]])
    deadline = time.monotonic() + 10
    while _files_open_under(server.proc.pid, root) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # another process: nothing to await but its fds
    assert _files_open_under(server.proc.pid, root) == []  # the marker's fd leaked here
    directory = root / "full"
    assert sorted(p.name for p in directory.iterdir()) == ["inbound.wav", "stream.json"]
    assert json.loads((directory / "stream.json").read_text())["status"] == "recording"
    marker = root / ".in-progress" / "full"
    assert marker.exists()  # unlocked: left for repair
    log = server.log.read_text()
    assert "sink 'wav' failed" in log and "during close" in log and "File too large" in log
    assert "Traceback" not in log
    context = ssl.create_default_context(cafile=str(tls_files.cert))
    metrics = (await http_get(server.port, "/metrics", context))[2]
    assert 'receiver_sink_errors_total{sink="wav"} 1.0' in metrics
    assert server.stop() == 0

    result = run_receiver("repair", str(root), cwd=server.cwd, env=env_with())
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    record = json.loads((directory / "stream.json").read_text())
    assert record["status"] == "interrupted"
    assert record["tracks"]["inbound"]["samples"] == len(audio)
    np.testing.assert_array_equal(read_strict(directory / "inbound.wav"), PCMU.decode(audio))
    assert not marker.exists()


def test_repair_reports_each_problem_in_one_line_and_retries_what_it_could_not_write(
    tmp_path: Path,
) -> None:
    """A WAV that is not RIFF and a stream.json that cannot be written (EFBIG) are one line each
    on stderr, exit 1, no traceback, no .tmp; the marker stays until the record is written."""
    root = tmp_path / "recordings"
    directory = root / "broken"
    directory.mkdir(parents=True)
    (root / ".in-progress").mkdir()
    marker = root / ".in-progress" / "broken"
    marker.touch()
    (directory / "outbound.wav").write_bytes(b"")  # its header never reached the disk
    good = PCMU.decode(PCMU.encode(np.arange(-4000, 4000, 4, dtype=np.int16)))
    with wave.open(str(directory / "inbound.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(good.astype("<i2").tobytes())
    big = {"status": "recording", "media_format": {"sample_rate_hz": 8000}, "pad": "p" * 300_000}
    (directory / "stream.json").write_text(json.dumps(big))
    (directory / "stream.json.tmp").write_text("")

    limited = subprocess.run(
        receiver_cmd("repair", str(root)),
        env=env_with(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=_file_size_limit(64 * 1024),
    )
    assert limited.returncode == 1
    assert "Traceback" not in limited.stderr
    problems = [line for line in limited.stderr.splitlines() if line.startswith(str(directory))]
    assert len(problems) == 2, limited.stderr
    assert "outbound.wav: outbound.wav is not a RIFF/WAVE file" in problems[0]
    assert "stream.json: not written (File too large); run repair again" in problems[1]
    assert sorted(p.name for p in directory.iterdir()) == [
        "inbound.wav",
        "outbound.wav",
        "stream.json",
    ]
    assert marker.exists()

    again = run_receiver("repair", str(root), cwd=tmp_path, env=env_with())
    assert again.returncode == 1  # the empty WAV stays a problem, reported
    assert "Traceback" not in again.stderr
    record = json.loads((directory / "stream.json").read_text())
    assert record["status"] == "interrupted"
    assert record["tracks"]["inbound"]["samples"] == len(good)
    assert not marker.exists()
