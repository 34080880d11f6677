"""A load generator cheap enough that the server is the bottleneck.

It does real TLS and WebSocket handshakes (with the bearer token), then writes frames that
were built and masked before the clock started, many per write, straight to the TLS
transports: no Python WebSocket client per frame. Run as its own process (``python -m
bench.loadgen``) pinned to another CPU than the server; it prints one JSON line of results.

Modes:
- ``burst``: each stream sends all its frames as fast as the server takes them, then ``stop``
  and waits for the server's close (which comes once the server finished its files);
- ``paced``: every 20 ms each stream sends one frame per track, like the platform, for
  ``--seconds``; the sender's own lateness is measured, so "real time held" is checked on
  both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import ssl
import statistics
import time
from dataclasses import dataclass, field

from websockets.frames import Close, Frame, Opcode

FRAME_MS = 20
TRACKS = ("inbound", "outbound")


def masked(text: str) -> bytes:
    """A client text frame, masked as RFC 6455 requires of clients."""
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=True)


def close_frame() -> bytes:
    return Frame(Opcode.CLOSE, Close(1000, "").serialize()).serialize(mask=True)


def media_frames(frames_per_track: int, *, payload_bytes: int = 160) -> list[bytes]:
    """Both tracks' media frames interleaved in time, as the platform numbers them."""
    raw = (bytes(range(256)) * (payload_bytes // 256 + 1))[:payload_bytes]
    payload = base64.b64encode(raw).decode()
    out = []
    sequence = 2
    for i in range(frames_per_track):
        for track in TRACKS:
            message = {
                "event": "media",
                "sequenceNumber": str(sequence),
                "media": {
                    "track": track,
                    "chunk": str(i + 1),
                    "timestamp": str(i * FRAME_MS),
                    "payload": payload,
                },
            }
            out.append(masked(json.dumps(message)))
            sequence += 1
    return out


def opening_frames(stream_sid: str) -> list[bytes]:
    """``connected`` and ``start`` of one stream (μ-law 8 kHz, both tracks)."""
    connected = {"event": "connected", "protocol": "Call", "version": "0.2.0"}
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "streamSid": stream_sid,
            "accountSid": "bench-account",
            "callSid": f"bench-call-{stream_sid}",
            "tracks": list(TRACKS),
            "customParameters": {"bench": "1"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    return [masked(json.dumps(connected)), masked(json.dumps(start))]


def stop_frame(sequence: int) -> bytes:
    return masked(json.dumps({"event": "stop", "sequenceNumber": str(sequence)}))


@dataclass
class Stream:
    """One connection after its handshake."""

    sid: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent_frames: int = 0
    closed_by_server: bool = False


@dataclass
class Result:
    mode: str
    streams: int
    handshakes_ok: int = 0
    frames_sent: int = 0
    seconds: float = 0.0
    send_lateness_ms: list[float] = field(default_factory=list)
    closed_by_server: int = 0

    def as_dict(self) -> dict[str, object]:
        lateness = sorted(self.send_lateness_ms) or [0.0]
        return {
            "mode": self.mode,
            "streams": self.streams,
            "handshakes_ok": self.handshakes_ok,
            "frames_sent": self.frames_sent,
            "seconds": round(self.seconds, 3),
            "send_lateness_ms_p50": round(statistics.median(lateness), 2),
            "send_lateness_ms_p99": round(lateness[int(0.99 * (len(lateness) - 1))], 2),
            "send_lateness_ms_max": round(lateness[-1], 2),
            "closed_by_server": self.closed_by_server,
        }


async def handshake(
    host: str, port: int, context: ssl.SSLContext | None, token: str, sid: str
) -> Stream:
    """TLS, then the HTTP upgrade with the bearer token; raises if not 101."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname="localhost" if context else None, limit=2**20
    )
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /bench/{sid} HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"handshake refused: {head.splitlines()[0]!r}")
    return Stream(sid, reader, writer)


async def wait_close(stream: Stream, timeout_s: float) -> None:
    """Read until the server's close frame or EOF (the server closes after finishing files)."""
    try:
        async with asyncio.timeout(timeout_s):
            while await stream.reader.read(65536):
                pass
        stream.closed_by_server = True
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass
    stream.writer.close()


async def run(args: argparse.Namespace) -> Result:
    context = None
    if args.cafile:
        context = ssl.create_default_context(cafile=args.cafile)
    media = media_frames(
        args.frames if args.mode == "burst" else int(args.seconds * 1000 / FRAME_MS)
    )
    result = Result(args.mode, args.streams)
    streams: list[Stream] = []
    prefix = f"{args.prefix}-{os.getpid()}"
    for start in range(0, args.streams, 50):  # handshakes in groups: a burst of 500 TLS accepts
        batch = [
            handshake(args.host, args.port, context, args.token, f"{prefix}-{i}")
            for i in range(start, min(args.streams, start + 50))
        ]
        streams += await asyncio.gather(*batch)
    result.handshakes_ok = len(streams)
    for stream in streams:
        stream.writer.write(b"".join(opening_frames(stream.sid)))
    began = time.perf_counter()
    if args.began_file:
        with open(args.began_file, "w") as f:
            f.write(repr(time.time()))
    if args.mode == "burst":
        blob = b"".join(media) + stop_frame(len(media) + 2) + close_frame()

        async def send(stream: Stream) -> None:
            for offset in range(0, len(blob), 256 * 1024):
                stream.writer.write(blob[offset : offset + 256 * 1024])
                await stream.writer.drain()
            stream.sent_frames = len(media)

        await asyncio.gather(*(send(s) for s in streams))
        await asyncio.gather(*(wait_close(s, 120) for s in streams))
    else:
        ticks = len(media) // 2
        for tick in range(ticks):
            due = began + tick * FRAME_MS / 1000
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result.send_lateness_ms.append(max(0.0, -delay) * 1000)
            pair = media[2 * tick] + media[2 * tick + 1]
            for stream in streams:
                stream.writer.write(pair)
            if tick % 25 == 0:  # let the transports flush; never block the schedule on one
                await asyncio.sleep(0)
        for stream in streams:
            stream.sent_frames = len(media)
            stream.writer.write(stop_frame(len(media) + 2) + close_frame())
        await asyncio.gather(*(s.writer.drain() for s in streams))
        await asyncio.gather(*(wait_close(s, 120) for s in streams))
    result.seconds = time.perf_counter() - began
    result.frames_sent = sum(s.sent_frames for s in streams)
    result.closed_by_server = sum(s.closed_by_server for s in streams)
    return result


def run_paced(args: argparse.Namespace) -> Result:
    """Paced mode on blocking TLS sockets: one ``sendall`` a stream a tick, no event loop.

    At 500 streams an asyncio TLS transport write per stream per 20 ms tick cost the generator
    more than the tick; a blocking ``SSLSocket.sendall`` costs a few microseconds.
    """
    context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    ticks = int(args.seconds * 1000 / FRAME_MS)
    media = media_frames(ticks)
    result = Result("paced", args.streams)
    sockets = []
    prefix = f"{args.prefix}-{os.getpid()}"
    for i in range(args.streams):
        raw = socket.create_connection((args.host, args.port))
        sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET /bench/{prefix}-{i} HTTP/1.1\r\nHost: localhost:{args.port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {args.token}\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"handshake refused: {head.splitlines()[0]!r}")
        sock.sendall(b"".join(opening_frames(f"{prefix}-{i}")))
        sockets.append(sock)
    result.handshakes_ok = len(sockets)
    began = time.perf_counter()
    if args.began_file:
        with open(args.began_file, "w") as f:
            f.write(repr(time.time()))
    for tick in range(ticks):
        delay = began + tick * FRAME_MS / 1000 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        result.send_lateness_ms.append(max(0.0, -delay) * 1000)
        pair = media[2 * tick] + media[2 * tick + 1]
        for sock in sockets:
            sock.sendall(pair)
    ending = stop_frame(len(media) + 2) + close_frame()
    for sock in sockets:
        sock.sendall(ending)
    for sock in sockets:
        sock.settimeout(120)
        try:
            while sock.recv(65536):
                pass
            result.closed_by_server += 1
        except OSError:
            pass
        sock.close()
    result.seconds = time.perf_counter() - began
    result.frames_sent = len(media) * len(sockets)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--cafile", help="trust this certificate (TLS); none: plain ws")
    parser.add_argument("--mode", choices=["burst", "paced"], default="burst")
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--frames", type=int, default=1000, help="burst: frames per track")
    parser.add_argument("--seconds", type=float, default=30.0, help="paced: length of each stream")
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    parser.add_argument("--began-file", help="paced: write the schedule's start (time.time())")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    result = run_paced(args) if args.mode == "paced" else asyncio.run(run(args))
    print(json.dumps(result.as_dict()), flush=True)


if __name__ == "__main__":
    main()
