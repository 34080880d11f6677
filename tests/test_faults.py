"""Faults: a write error on one stream (RLIMIT_FSIZE in a server subprocess, the way a full
disk fails a write) ends that stream with a reason; the others and the server carry on."""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from receiver.codecs import CLI_CODECS, codec_for
from receiver.simulate import build_messages, play
from tests.support.audio import read_wav
from tests.support.commands import receiver_cmd
from tests.support.receiver import TOKEN, TlsFiles

PCMU = codec_for(CLI_CODECS["pcmu"])
FILE_LIMIT_BYTES = 200_000  # a 8 kHz 16-bit WAV passes it after 12.5 s


def limit_file_size() -> None:
    """In the server process: any file growing past the limit fails its write (EFBIG)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT_BYTES, FILE_LIMIT_BYTES))


async def test_write_error_ends_only_that_stream(
    tmp_path: Path, served: Any, tls_files: TlsFiles, client_ssl: ssl.SSLContext, speech: Any
) -> None:
    """The stream whose file cannot grow is closed with 1011 and keeps what was written;
    a concurrent stream and a later one are recorded sample-exact; the server stays up."""
    server = served(
        preexec_fn=limit_file_size,
        RECEIVER_TOKENS=TOKEN,
        RECEIVER_TLS_CERT=str(tls_files.cert),
        RECEIVER_TLS_KEY=str(tls_files.key),
    )
    server.wait_listening()
    url = f"wss://localhost:{server.port}/"
    long_audio = np.tile(speech["inbound"].samples(8000), 10)[: 30 * 8000]
    short_audio = speech["outbound"].samples(8000)
    long_stream = build_messages(
        codec=PCMU, tracks={"inbound": PCMU.encode(long_audio)}, stream_sid="long"
    )
    short_stream = build_messages(
        codec=PCMU, tracks={"inbound": PCMU.encode(short_audio)}, stream_sid="short"
    )
    long_result, short_result = await asyncio.gather(
        play(url, long_stream, token=TOKEN, ssl_context=client_ssl, pace=0.05),
        play(url, short_stream, token=TOKEN, ssl_context=client_ssl, pace=0.05),
    )
    assert long_result.close_code == 1011
    assert "recording failed" in (long_result.close_reason or "")
    assert short_result.close_code == 1000

    root = tmp_path / "recordings"
    expected_short = PCMU.decode(PCMU.encode(short_audio))
    np.testing.assert_array_equal(read_wav(root / "short" / "inbound.wav")[0], expected_short)
    kept, _ = read_wav(root / "long" / "inbound.wav")
    assert 10 * 8000 <= len(kept) < 13 * 8000
    np.testing.assert_array_equal(kept, PCMU.decode(PCMU.encode(long_audio))[: len(kept)])
    record = json.loads((root / "long" / "stream.json").read_text())
    assert record["end"]["kind"] == "error"
    assert record["end"]["close_code"] == 1011
    assert any("wav" in e and "inbound.wav" in e for e in record["sink_errors"])

    later = build_messages(
        codec=PCMU, tracks={"inbound": PCMU.encode(short_audio)}, stream_sid="later"
    )
    assert (await play(url, later, token=TOKEN, ssl_context=client_ssl)).close_code == 1000
    np.testing.assert_array_equal(read_wav(root / "later" / "inbound.wav")[0], expected_short)
    health = subprocess.run(
        receiver_cmd("health"), env=server.env, capture_output=True, text=True, check=False
    )
    assert health.returncode == 0, health.stdout + health.stderr
    log = server.log.read_text()
    assert "writing inbound.wav failed" in log
    assert server.stop() == 0
