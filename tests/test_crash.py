"""kill -9 mid-stream: the WAV files open in strict readers without repair, hold all but the
last batch, and `receiver repair` finishes them and marks the streams interrupted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from websockets.asyncio.client import connect

from receiver.codecs import CLI_CODECS, codec_for
from receiver.simulate import build_messages
from tests.conftest import TOKEN, TlsFiles, env_with, run, run_receiver
from tests.soak_helpers import upgrade_request

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
    from websockets.frames import Close, Frame, Opcode

    server = served(
        RECEIVER_TOKENS=TOKEN,
        RECEIVER_TLS_CERT=str(tls_files.cert),
        RECEIVER_TLS_KEY=str(tls_files.key),
    )
    server.wait_listening()
    root = server.cwd / "recordings"
    audio = PCMU.encode((np.arange(8000 * 6) % 4000 - 2000).astype(np.int16))
    expected = PCMU.decode(audio)
    close = Frame(Opcode.CLOSE, Close(1000, "").serialize()).serialize(mask=True)

    async def stream(number: int) -> list[int]:
        sid = f"whole-{number}"
        messages = build_messages(
            codec=PCMU, tracks={"inbound": audio, "outbound": audio}, stream_sid=sid
        )
        frames = b"".join(Frame(Opcode.TEXT, m.encode()).serialize(mask=True) for m in messages)
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
