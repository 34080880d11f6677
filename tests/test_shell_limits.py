"""The connection shell's limits: what one client can make the receiver hold, how every ending
is ordered, and what /healthz, /metrics and the logs say. A real receiver on loopback over
real TLS; raw clients where a well-behaved one cannot misbehave enough."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.frames import Opcode

from receiver import tls
from receiver.codecs import CLI_CODECS, codec_for
from receiver.connection import TlsSession
from receiver.logs import JsonFormatter
from receiver.metrics import COUNTERS
from receiver.server import Receiver
from receiver.simulate import build_messages
from receiver.sinks.wav import WavSink
from tests.support.audio import read_wav
from tests.support.commands import free_port
from tests.support.http import http_get
from tests.support.receiver import TOKEN, StartReceiver, make_settings, url, wait_idle
from tests.support.recordings import record_of, recording
from tests.support.waits import until
from tests.support.wire import read_close, read_head, start_frame, upgrade_request, ws_frame

PCMU = codec_for(CLI_CODECS["pcmu"])


async def open_stream(
    receiver: Receiver,
    context: ssl.SSLContext,
    *,
    rcvbuf_bytes: int | None = None,
    with_upgrade: bytes = b"",
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TLS connection upgraded to a stream (101 read); ``with_upgrade`` is sent in the
    same write as the upgrade request (websockets then keeps the stream)."""
    sock = socket.socket()
    if rcvbuf_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    sock.connect(("127.0.0.1", receiver.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=context, server_hostname="localhost", limit=4096
    )
    writer.write(upgrade_request("/media", TOKEN) + with_upgrade)
    await writer.drain()
    assert await read_head(reader) == 101
    return reader, writer


@pytest.mark.parametrize("after_101", [True, False], ids=["after-101", "with-upgrade"])
async def test_client_that_never_reads_its_pongs_is_aborted(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, after_101: bool
) -> None:
    """Pings as fast as possible from a client that never reads: the server holds at most
    max_write_buffer_bytes for it, then aborts it (counted) and records the stream."""
    receiver = await start_receiver(max_write_buffer_bytes=256 * 1024)
    start = ws_frame(opcode=Opcode.TEXT, payload=start_frame("pinger").encode())
    _reader, writer = await open_stream(
        receiver, client_ssl, rcvbuf_bytes=4096, with_upgrade=b"" if after_101 else start
    )
    if after_101:
        writer.write(start)
    ping = ws_frame(opcode=Opcode.PING, payload=b"p" * 125)
    sent = 0
    aborted = False
    try:
        async with asyncio.timeout(60):
            while sent < 200 * 1024 * 1024:
                writer.write(ping * 512)
                await writer.drain()
                sent += len(ping) * 512
                buffered = max(
                    (s.ws.transport.get_write_buffer_size() for s in receiver._streams), default=0
                )
                assert buffered <= 2 * 256 * 1024 + 64 * 1024
                if receiver.counters["write_buffer_overflows"]:
                    # Cut off: a client whose reading is paused may not see the reset for a
                    # while (asyncio's client sends into the void until it reads).
                    aborted = True
                    break
    except (ConnectionError, ssl.SSLError):
        aborted = True
    writer.transport.abort()
    assert aborted, f"sent {sent} bytes of pings, never cut off"
    assert sent < 100 * 1024 * 1024
    await wait_idle(receiver)
    assert receiver.counters["write_buffer_overflows"] == 1
    assert record_of(recording(receiver, "pinger"))["end"]["close_code"] == 1006


def raw_frames(messages: list[str]) -> bytes:
    return b"".join(ws_frame(opcode=Opcode.TEXT, payload=m.encode()) for m in messages)


BAD_FRAMES = {
    # a message over max_message_bytes (4096 here): websockets closes 1009
    "too-big-1009": ws_frame(
        opcode=Opcode.TEXT, payload=json.dumps({"event": "mark", "x": "y" * 6000}).encode()
    ),
    # a text frame that is not UTF-8: 1007
    "utf8-1007": ws_frame(opcode=Opcode.TEXT, payload=b"\xff\xfe{}"),
    # a reserved opcode: bad framing, 1002
    "opcode-1002": bytes([0x83, 0x80]) + b"\x00\x00\x00\x00",
}


@pytest.mark.parametrize("bad", sorted(BAD_FRAMES))
@pytest.mark.parametrize("after_101", [True, False], ids=["after-101", "with-upgrade"])
async def test_closes_websockets_sends_itself_come_after_the_files(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, bad: str, after_101: bool
) -> None:
    """When websockets refuses a frame itself, the close frame goes out only once the files
    are finished: a client that reads stream.json on receiving it finds it complete."""
    receiver = await start_receiver(max_message_bytes=4096)
    audio = PCMU.encode(np.arange(-1600, 1600, 2, dtype=np.int16))
    sid = f"{bad}-{after_101}"
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid=sid, stop=False)
    reader, writer = await open_stream(receiver, client_ssl)
    if after_101:  # after the 101: the receiver splits the frames itself
        writer.write(raw_frames(messages))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(BAD_FRAMES[bad])
    else:  # sent at once: the bytes after the head reach the splitter
        writer.write(raw_frames(messages) + BAD_FRAMES[bad])
    async with asyncio.timeout(10):
        code, _ = await read_close(reader)
    status = record_of(recording(receiver, sid))["status"]
    writer.transport.abort()
    assert code == int(bad[-4:])
    assert status == "complete"


class SlowToClose:
    """A sink that takes its time to finish (the wav sink, which writes stream.json, closes
    after it): a close answered before the files would find no stream.json."""

    location = None
    writes_record = False

    def open(self, info: Any) -> None:
        pass

    def write(self, track: Any, position: int, samples: Any) -> None:
        pass

    def event(self, record: Any) -> None:
        pass

    def close(self, summary: Any) -> None:
        pass

    async def aclose(self, summary: Any) -> None:
        await asyncio.sleep(0.5)


async def test_a_client_that_half_closes_gets_its_close_after_the_files(tmp_path: Path) -> None:
    """stop, a close frame, then the client's FIN (a TCP half-close, on a plain receiver: TLS
    streams in asyncio cannot half-close): the transport stays open, and the close is answered
    once the files are finished, sample-exact."""
    (tmp_path / "recordings").mkdir()
    factories = [("wav", WavSink.from_settings), ("slow", lambda settings: SlowToClose())]
    receiver = Receiver(
        make_settings(tmp_path / "recordings"), ssl_context=None, sink_factories=factories
    )
    await receiver.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
        writer.write(upgrade_request("/media", TOKEN))
        assert await read_head(reader) == 101
        audio = PCMU.encode(np.arange(-3200, 3200, 2, dtype=np.int16))
        messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="half")
        close = ws_frame(opcode=Opcode.CLOSE, payload=(1000).to_bytes(2, "big"))
        writer.write(raw_frames(messages) + close)
        writer.write_eof()
        async with asyncio.timeout(10):
            code, _ = await read_close(reader)
        status = record_of(recording(receiver, "half"))["status"]
        assert (code, status) == (1000, "complete")
        samples, _ = read_wav(recording(receiver, "half") / "inbound.wav")
        np.testing.assert_array_equal(samples, PCMU.decode(audio))
        writer.close()
    finally:
        await receiver.shutdown(drain_timeout_s=0)


async def test_server_close_does_not_linger_while_the_client_keeps_sending(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """After our close frame (1007 here) a client that keeps sending and never answers is cut
    within close_timeout_s, and stops counting as an active stream as soon as its files are
    finished."""
    receiver = await start_receiver(close_timeout_s=0.5)
    reader, writer = await open_stream(receiver, client_ssl)
    writer.write(raw_frames([start_frame("linger"), "{not json"]))
    async with asyncio.timeout(10):
        code, _ = await read_close(reader)
    closed_at = time.monotonic()
    assert code == 1007
    assert receiver.active_streams == 0
    media = ws_frame(opcode=Opcode.TEXT, payload=b'{"event": "media", "media": {"payload": ""}}')
    cut = False
    try:
        async with asyncio.timeout(8):
            while True:
                writer.write(media)
                await writer.drain()
                await asyncio.sleep(0.05)
    except (ConnectionError, ssl.SSLError):
        cut = True
    except TimeoutError:
        pass
    writer.transport.abort()
    assert cut, "the connection was still open 8 s after the close frame"
    assert time.monotonic() - closed_at < 5
    await wait_idle(receiver)
    assert receiver.counters["close_timeouts"] == 1


async def test_keepalive_timeout_is_an_end_of_its_own(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """A client that answers no ping ends as keepalive-timeout (1011), its audio kept, and
    the close frame comes after the files."""
    receiver = await start_receiver(ping_interval_s=0.2, ping_timeout_s=0.3)
    audio = PCMU.encode(np.full(800, 1000, dtype=np.int16))
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="ka", stop=False)
    reader, writer = await open_stream(receiver, client_ssl)
    writer.write(raw_frames(messages))
    async with asyncio.timeout(10):
        code, _ = await read_close(reader)  # pings are read and never answered
    record = record_of(recording(receiver, "ka"))
    writer.transport.abort()
    assert code == 1011
    assert record["status"] == "complete"
    assert record["end"]["kind"] == "keepalive-timeout"
    await wait_idle(receiver)
    assert receiver.counters["streams_ended", "keepalive-timeout"] == 1
    _, _, body = await http_get(receiver.port, "/metrics", client_ssl)
    assert 'receiver_streams_ended_total{end="keepalive-timeout"} 1.0' in body


async def wait_health(receiver: Receiver, context: ssl.SSLContext, status: int) -> str:
    """/healthz until it answers ``status`` (it refreshes at most once a second)."""
    async with asyncio.timeout(10):
        while True:
            got, _, body = await http_get(receiver.port, "/healthz", context)
            if got == status:
                return body
            await asyncio.sleep(0.2)


async def test_healthz_says_503_when_recordings_cannot_be_written(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext, tmp_path: Path
) -> None:
    """/healthz turns 503 with the reason once the recordings directory is gone, and back."""
    recordings = tmp_path / "rec"
    receiver = await start_receiver(recordings_dir=recordings)
    assert (await http_get(receiver.port, "/healthz", client_ssl))[0] == 200
    recordings.rename(tmp_path / "moved")
    body = await wait_health(receiver, client_ssl, 503)
    assert "not writable" in body
    (tmp_path / "moved").rename(recordings)
    await wait_health(receiver, client_ssl, 200)
    assert receiver.counters["health_failures", "not_writable"] >= 1


async def test_healthz_says_503_when_the_disk_is_nearly_full(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """Below RECEIVER_MIN_FREE_DISK_MB free, /healthz answers 503 and says how much is free."""
    receiver = await start_receiver(min_free_disk_mb=1024**3)
    status, _, body = await http_get(receiver.port, "/healthz", client_ssl)
    assert status == 503
    assert "disk nearly full" in body and "RECEIVER_MIN_FREE_DISK_MB" in body


async def raw_http(receiver: Receiver, context: ssl.SSLContext, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", receiver.port, ssl=context, server_hostname="localhost"
    )
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    return answer


async def test_bad_http_gets_a_4xx_a_line_and_a_counter(
    receiver: Receiver, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """Two Authorization headers, an unparsable request line, a plain GET for a stream:
    each a 4xx, counted, a WARNING line; never a 500 or a traceback."""
    caplog.set_level(logging.INFO)
    upgrade = upgrade_request("/media", TOKEN)
    twice = upgrade.replace(b"\r\n\r\n", f"\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert (await raw_http(receiver, client_ssl, twice)).startswith(b"HTTP/1.1 400")
    garbage = b"GARBAGE\x01 / HTTP/9\r\n\r\n"
    assert (await raw_http(receiver, client_ssl, garbage)).startswith(b"HTTP/1.1 400")
    plain = b"GET /media HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + TOKEN.encode()
    assert (await raw_http(receiver, client_ssl, plain + b"\r\n\r\n")).startswith(b"HTTP/1.1 426")
    assert receiver.counters["bad_requests", "duplicate_header"] == 1
    assert receiver.counters["bad_requests", "unparsable"] == 1
    assert receiver.counters["bad_requests", "not_websocket"] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert sum("bad HTTP request" in r.getMessage() for r in caplog.records) == 3
    assert TOKEN not in caplog.text


async def test_every_counter_is_exported(receiver: Receiver, client_ssl: ssl.SSLContext) -> None:
    """/metrics names every typed counter, those counted and never exported before included."""
    _, _, body = await http_get(receiver.port, "/metrics", client_ssl)
    for counter in COUNTERS:
        assert f"# TYPE receiver_{counter.value}_total counter" in body or (
            f"# TYPE receiver_{counter.value} counter" in body
        ), counter
    for name in ("internal_errors", "recording_failures", "unknown_events"):
        assert f"receiver_{name}_total 0.0" in body


async def test_health_probes_log_nothing_at_info_and_the_summary_has_fields(
    receiver: Receiver, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """/healthz and /metrics write no INFO line; the end-of-stream summary carries its figures
    as fields of the JSON line."""
    caplog.set_level(logging.INFO)
    for path in ("/healthz", "/metrics"):
        await http_get(receiver.port, path, client_ssl)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("websockets")] == []
    audio = PCMU.encode(np.full(1600, 100, dtype=np.int16))
    messages = build_messages(codec=PCMU, tracks={"inbound": audio}, stream_sid="fields")
    async with connect(
        url(receiver), ssl=client_ssl, additional_headers={"Authorization": f"Bearer {TOKEN}"}
    ) as ws:
        for message in messages:
            await ws.send(message)
        await ws.wait_closed()
    await wait_idle(receiver)
    (summary,) = [r for r in caplog.records if r.getMessage().startswith("stream ended")]
    line = json.loads(JsonFormatter().format(summary))
    assert line["end"] == "stop" and line["close_code"] == 1000
    assert line["tracks"]["inbound"]["duration_s"] == 0.2
    assert line["stream_sid"] == "fields"


def test_busy_metrics_port_is_named_and_the_start_line_says_where_metrics_are(
    served: Any, tls_files: Any
) -> None:
    """A busy RECEIVER_METRICS_PORT is reported as the metrics port; the start-up line of a
    good run says where /metrics is served."""
    tls_env = {"RECEIVER_TLS_CERT": str(tls_files.cert), "RECEIVER_TLS_KEY": str(tls_files.key)}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = served(RECEIVER_TOKENS=TOKEN, RECEIVER_METRICS_PORT=str(port), **tls_env)
        assert server.proc.wait(timeout=30) == 1
    log = server.log.read_text()
    assert f"cannot listen on 127.0.0.1:{port} for metrics" in log
    metrics_port = free_port()
    good = served(RECEIVER_TOKENS=TOKEN, RECEIVER_METRICS_PORT=str(metrics_port), **tls_env)
    text = good.wait_listening()
    assert f"metrics: http://127.0.0.1:{metrics_port}/metrics" in text
    assert good.stop() == 0
    assert "stopped: 0 streams recorded" in good.log.read_text()


async def test_plain_http_to_the_tls_port_is_a_warning_and_a_counter(
    receiver: Receiver, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """http:// or ws:// to the TLS port: one WARNING line saying so (rate-limited: three tries,
    one line), a counter; the server stays healthy."""
    caplog.set_level(logging.INFO)
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        async with asyncio.timeout(10):
            await reader.read()
        writer.close()
    assert receiver.counters["tls_handshake_failures", "plain_http"] == 3
    lines = [r for r in caplog.records if "plain HTTP" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert (await http_get(receiver.port, "/healthz", client_ssl))[0] == 200
    await until(lambda: receiver.gate.pending == 0)


async def test_handshakes_in_progress_are_capped_at_accept(
    start_receiver: StartReceiver, client_ssl: ssl.SSLContext
) -> None:
    """Idle TCP connections past max_pending_handshakes_per_ip are reset at accept and
    counted; once they go, a stream from the same address gets through."""
    receiver = await start_receiver(max_pending_handshakes_per_ip=5)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    reset = 0
    for _ in range(12):
        try:
            idle.append(await asyncio.open_connection("127.0.0.1", receiver.port))
        except ConnectionResetError:
            reset += 1
    for reader, writer in idle:
        try:
            async with asyncio.timeout(0.5):
                await reader.read()
            reset += 1
        except ConnectionResetError:
            reset += 1
        except TimeoutError:
            pass
        writer.transport.abort()
    assert reset == 7
    assert receiver.counters["connections_refused", "pending_ip_limit"] == 7
    await until(lambda: receiver.gate.pending == 0)
    assert (await http_get(receiver.port, "/healthz", client_ssl))[0] == 200


HOLD_CONNECTIONS = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    try:
        held.append(socket.create_connection(("127.0.0.1", int(sys.argv[1]))))
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(60)
"""


async def test_accept_out_of_fds_is_logged_and_counted(
    receiver: Receiver, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """accept() failing with EMFILE is one ERROR line and a counter; accepting resumes once
    fds are free again (here the fd limit is lowered under the receiver while a client
    process holds connections)."""
    import resource
    import subprocess
    import sys

    caplog.set_level(logging.INFO)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(list(Path("/proc/self/fd").iterdir()))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_CONNECTIONS, str(receiver.port), "40"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 10, hard))
        try:
            assert holder.stdout is not None
            assert int(await asyncio.to_thread(holder.stdout.readline)) == 40
            await until(lambda: receiver.counters["accept_errors", "EMFILE"] > 0)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    errors = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert (await http_get(receiver.port, "/healthz", client_ssl))[0] == 200


def test_serve_raises_the_fd_limit_and_refuses_streams_that_cannot_fit(
    served: Any, tls_files: Any, tmp_path: Path
) -> None:
    """`receiver serve` raises the soft fd limit to the hard one; when max_streams cannot fit
    it refuses to start with one line naming the variable."""
    import resource

    def limit(soft: int, hard: int) -> Any:
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    tls_env = {"RECEIVER_TLS_CERT": str(tls_files.cert), "RECEIVER_TLS_KEY": str(tls_files.key)}
    raised = served(preexec_fn=limit(1024, 8192), RECEIVER_TOKENS=TOKEN, **tls_env)
    assert "file descriptor limit raised from 1024 to 8192" in raised.wait_listening()
    assert raised.stop() == 0
    refused = served(preexec_fn=limit(1024, 1024), RECEIVER_TOKENS=TOKEN, **tls_env)
    assert refused.proc.wait(timeout=30) == 2
    (line,) = refused.log.read_text().strip().splitlines()
    assert line.startswith("receiver: RECEIVER_MAX_STREAMS:") and "need 3064" in line
    fits = served(
        preexec_fn=limit(1024, 1024),
        RECEIVER_TOKENS=TOKEN,
        RECEIVER_MAX_STREAMS="100",
        RECEIVER_MAX_PENDING_HANDSHAKES="500",
        **tls_env,
    )
    fits.wait_listening()
    assert fits.stop() == 0


_MALLINFO2 = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
_MALLINFO2 += ("uordblks", "fordblks", "keepcost")


class _MallocInfo(ctypes.Structure):
    """glibc's ``struct mallinfo2``."""

    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2]


def malloc_in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back (native memory: OpenSSL's too)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallocInfo
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def test_a_burst_of_ciphertext_leaves_no_large_tls_buffer(tls_files: Any) -> None:
    """A 256 KiB read (uvloop's largest) of a client's records is fed to its TLS object in
    slices: OpenSSL's memory BIO keeps the room of its largest write for the connection's life,
    which was 344 KiB a connection; every byte still comes out, in order."""
    server = tls.server_context(tls_files.cert, tls_files.key)
    client = tls.client_context(tls_files.cert)
    pairs = []
    for _ in range(50):
        session = TlsSession(server)
        to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
        peer = client.wrap_bio(to_client, to_server, server_hostname="localhost")
        while not session.established:
            with contextlib.suppress(ssl.SSLWantReadError):
                peer.do_handshake()
            session.receive(to_server.read())
            to_client.write(session.outgoing())
        pairs.append((session, peer, to_server))
    plaintext = bytes(range(256)) * 1600  # 400 KiB, in records of 400 bytes as frames come
    bursts = []
    for _, peer, to_server in pairs:
        for i in range(0, len(plaintext), 400):
            peer.write(plaintext[i : i + 400])
        ciphertext = to_server.read()
        bursts.append(
            [ciphertext[i : i + 256 * 1024] for i in range(0, len(ciphertext), 256 * 1024)]
        )
    before = malloc_in_use()
    for (session, _, _), reads in zip(pairs, bursts, strict=True):
        assert b"".join([session.receive(read) for read in reads]) == plaintext
    kept = (malloc_in_use() - before) / len(pairs)
    assert kept < 64 * 1024, f"{kept / 1024:.1f} KiB kept a connection"
