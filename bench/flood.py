"""RSS of a `receiver serve` over repeated floods of idle, half-open and TLS-idle connections.

    .venv/bin/python -m bench.flood [--rounds 5] [--connections 5000] [--caps 19000,19000]

Each round opens ``--connections`` connections from loopback (a third idle TCP, a third that
sent only a TLS ClientHello, a third with TLS done and nothing more), holds them, resets them
all, waits 6 s (the memory trimmer checks every 5 s) and prints the server's RSS and fds.
``--caps`` sets RECEIVER_MAX_PENDING_HANDSHAKES and _PER_IP (default: high enough that every
connection is admitted; the receiver's defaults admit 200 from one address).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from receiver import tls


def client_hello(context: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls_object.do_handshake()
    return outgoing.read()


def figures(pid: int) -> tuple[int, int]:
    """(RSS in MB, open fds) of process ``pid``."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            rss = int(line.split()[1]) // 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def flood(port: int, connections: int) -> list[asyncio.StreamWriter]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    hello = client_hello(context)
    held: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(200)

    async def one(kind: int) -> None:
        async with gate:
            try:
                if kind == 2:
                    _, writer = await asyncio.open_connection(
                        "127.0.0.1", port, ssl=context, server_hostname="localhost"
                    )
                else:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    if kind == 1:
                        writer.write(hello)
                held.append(writer)
            except OSError:
                pass  # refused at accept

    await asyncio.gather(*(one(i % 3) for i in range(connections)))
    return held


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--caps", default="19000,19000")
    args = parser.parse_args()
    pending, per_ip = args.caps.split(",")
    work = Path(tempfile.mkdtemp(prefix="flood-"))
    tls.write_self_signed(work / "cert.pem", work / "key.pem")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    env.update(
        RECEIVER_PORT=str(port),
        RECEIVER_HOST="127.0.0.1",
        RECEIVER_TOKENS="flood-token-0123456789abcdef",
        RECEIVER_TLS_CERT=str(work / "cert.pem"),
        RECEIVER_TLS_KEY=str(work / "key.pem"),
        RECEIVER_MAX_STREAMS="100",
        RECEIVER_MAX_PENDING_HANDSHAKES=pending,
        RECEIVER_MAX_PENDING_HANDSHAKES_PER_IP=per_ip,
        RECEIVER_HANDSHAKE_TIMEOUT_S="30",
    )
    log = work / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "receiver", "serve"], cwd=work, env=env, stderr=out
        )
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        rss, fds = figures(server.pid)
        print(f"before: RSS {rss} MB, {fds} fds")
        for number in range(1, args.rounds + 1):
            held = await flood(port, args.connections)
            peak, _ = figures(server.pid)
            for writer in held:
                writer.transport.abort()
            await asyncio.sleep(6)
            rss, fds = figures(server.pid)
            print(f"round {number}: {len(held)} held, peak {peak} MB, after {rss} MB, {fds} fds")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
