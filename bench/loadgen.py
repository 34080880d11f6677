"""A load generator cheap enough that the server is the bottleneck.

It does real TLS and WebSocket handshakes (with the bearer token), then writes frames that
were built and masked before the clock started, straight to the sockets: no Python WebSocket
client per frame. Run as its own process (``python -m bench.loadgen``) pinned to another CPU
than the server; it prints one JSON line of results.

Modes:
- ``burst``: each stream sends all its frames as fast as the server takes them (asyncio TLS
  transports, 256 KiB a write), then ``stop`` and waits for the server's close (which comes
  once the server finished its files);
- ``paced``: every 20 ms each stream sends one frame per track, like the platform, for
  ``--seconds``, on non-blocking raw sockets with TLS through ``ssl.MemoryBIO`` and records
  sealed ahead (see ``run_paced``); the generator's own lateness, work per tick and CPU are
  measured, so "real time held" is checked on both sides and the generator is seen not to be
  the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import socket
import ssl
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from websockets.frames import Close, Frame, Opcode

FRAME_MS = 20
PHASES = 10  # paced: streams start their 20 ms ticks at ten offsets, 2 ms apart
AHEAD_TICKS = 50  # paced: each stream's records are sealed a second (or two) in advance
PENDING_CAP = 1 << 20  # paced: a stream's unsent backlog (30 s of it) beyond this drops frames
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
    schedule_cpu_s: float = 0.0
    schedule_wall_s: float = 0.0
    tick_work_ms: list[float] = field(default_factory=list)  # paced: a tick's work, all phases
    stalled_writes: int = 0  # paced: stream-ticks whose bytes the kernel did not take at once
    handshakes_s: float = 0.0  # paced: all the streams' TLS and HTTP handshakes, in turn
    drain_s: float = 0.0  # paced: from the stop to the last stream's close
    frames_dropped: int = 0  # paced: never sent, a stream's backlog was over PENDING_CAP

    def as_dict(self) -> dict[str, object]:
        lateness = sorted(self.send_lateness_ms) or [0.0]
        work = sorted(self.tick_work_ms) or [0.0]
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
            "tick_work_ms_p50": round(statistics.median(work), 2),
            "tick_work_ms_p99": round(work[int(0.99 * (len(work) - 1))], 2),
            "handshakes_s": round(self.handshakes_s, 3),
            "drain_s": round(self.drain_s, 3),
            "stalled_writes": self.stalled_writes,
            "frames_dropped": self.frames_dropped,
            "cpu_utilization": round(self.schedule_cpu_s / self.schedule_wall_s, 3)
            if self.schedule_wall_s
            else None,
            # Paced: each (tick, phase)'s lateness, tick by tick, so the driver can measure a
            # frame's lag from when it was sent, not from when it was due.
            "send_lateness_ms_each": [round(x, 1) for x in self.send_lateness_ms]
            if self.mode == "paced"
            else None,
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


class Conn:
    """One paced stream: TLS through ``ssl.MemoryBIO`` over a non-blocking raw socket.

    The generator never blocks on one stream: what the kernel does not take now waits in
    ``pending`` and goes first at the next tick, so its own lateness measures only its own
    cost, and ``stalled_writes`` says the server (not the generator) fell behind.
    """

    __slots__ = (
        "ahead",
        "dropped",
        "incoming",
        "outgoing",
        "pending",
        "pongs",
        "sealed_until",
        "server",
        "sid",
        "sock",
        "tls",
    )

    def __init__(self, sid: str, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        self.sid = sid
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = (
            context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
            if context
            else None
        )
        self.pending = b""
        self.dropped = 0
        self.server = b""  # the server's plaintext not parsed yet (pings)
        self.ahead: deque[bytes] = deque()  # the next ticks' records, sealed in advance
        self.sealed_until = 0  # the first tick not in ``ahead``
        self.pongs = b""  # to seal before the next ticks (the TLS records' order is sending's)

    def seal(self, data: bytes) -> bytes:
        if self.tls is None:
            return data
        self.tls.write(data)
        return self.outgoing.read()

    def seal_ahead(self, pairs: list[bytes], until: int) -> None:
        """Seal the ticks up to ``until`` now, in one go: one stream's TLS state stays in
        the cache (1.7 us a record, against 5-8 us sealing each stream in turn every tick)."""
        start, until = self.sealed_until, min(until, len(pairs))
        if until <= start:
            return
        first = self.seal(self.pongs) if self.pongs else b""
        self.pongs = b""
        self.ahead.append(first + self.seal(pairs[start]))
        self.ahead.extend(self.seal(pair) for pair in pairs[start + 1 : until])
        self.sealed_until = until

    def blocking_io(self) -> None:
        """Handshake phase: flush what TLS wants to send, read one chunk into it."""
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed during the handshake")
        self.incoming.write(chunk)

    def open(self, host: str, port: int, token: str, path: str) -> None:
        """TLS, then the HTTP upgrade with the bearer token; raises if not 101."""
        if self.tls is not None:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self.blocking_io()
            if self.outgoing.pending:
                self.sock.sendall(self.outgoing.read())
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            self.seal(
                (
                    f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
                ).encode()
            )
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.receive_blocking()
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"handshake refused: {head.splitlines()[0]!r}")
        self.server = head.split(b"\r\n\r\n", 1)[1]
        self.sock.setblocking(False)

    def receive_blocking(self) -> bytes:
        if self.tls is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed during the handshake")
            return chunk
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self.blocking_io()

    def send(self, data: bytes, cap: int) -> bool:
        """Queue ``data`` behind what is pending and write what the kernel takes now;
        False if the write stalled (the server is not keeping up)."""
        if self.pending:
            if len(self.pending) > cap:
                self.dropped += 1
                return False
            data = self.pending + data
        try:
            written = self.sock.send(data)
        except BlockingIOError:
            written = 0
        except OSError:  # the server closed this stream: what it was sent is never sent
            self.dropped += 1
            self.pending = b""
            return False
        self.pending = data[written:]
        return not self.pending

    def wait_close(self) -> None:
        """Read until the server ends TLS (close_notify) or TCP; OSError on a timeout."""
        while chunk := self.sock.recv(65536):
            if self.tls is None:
                continue
            self.incoming.write(chunk)
            try:
                while self.tls.read(65536):
                    pass
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLZeroReturnError:
                return
            return  # a read of b"": TLS ended

    def answer_pings(self) -> None:
        """Read what the server sent (non-blocking) and pong its pings, so streams outlive
        the servers' keepalive (20 s + 20 s) in long runs."""
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, ssl.SSLError):
            return
        if not chunk:
            return
        if self.tls is not None:
            self.incoming.write(chunk)
            chunk = b""
            try:
                while True:
                    chunk += self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
        self.server += chunk
        while len(self.server) >= 2:
            opcode, length = self.server[0] & 0x0F, self.server[1] & 0x7F
            head = 2 + {126: 2, 127: 8}.get(length, 0)
            if len(self.server) < head:
                return
            if length >= 126:
                length = int.from_bytes(self.server[2:head], "big")
            if len(self.server) < head + length:
                return
            payload, self.server = self.server[head : head + length], self.server[head + length :]
            if opcode == Opcode.PING.value:  # sealed behind the ticks sealed already
                self.pongs += Frame(Opcode.PONG, payload).serialize(mask=True)


def run_paced(args: argparse.Namespace) -> Result:
    """Paced mode: every 20 ms, one write of both tracks' frames to each stream, no event loop.

    Frames are serialized and masked before the clock starts; a tick is, per stream, one
    non-blocking ``send`` of a TLS record sealed up to two seconds earlier (an asyncio TLS
    transport write per stream per tick cost more than the tick at 500 streams; sealing each
    stream in turn every tick, 5-8 us a record with the caches cold, made it late at 1,000).
    The streams tick at PHASES offsets. The generator's own CPU time, lateness and work per
    tick over the schedule are reported, so it can be seen not to be the bottleneck.
    """
    context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    ticks = int(args.seconds * 1000 / FRAME_MS)
    media = media_frames(ticks)
    pairs = [media[2 * t] + media[2 * t + 1] for t in range(ticks)]
    del media
    result = Result("paced", args.streams)
    conns: list[Conn] = []
    prefix = f"{args.prefix}-{os.getpid()}"
    opened = time.perf_counter()
    for i in range(args.streams):
        conn = Conn(f"{prefix}-{i}", socket.create_connection((args.host, args.port)), context)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.open(args.host, args.port, args.token, f"/bench/{conn.sid}")
        conns.append(conn)
    # The opening events before the clock: the schedule starts with the first media frame.
    for conn in conns:
        conn.send(conn.seal(b"".join(opening_frames(conn.sid))), PENDING_CAP)
        conn.seal_ahead(pairs, 2 * AHEAD_TICKS)
    result.handshakes_ok = len(conns)
    result.handshakes_s = time.perf_counter() - opened
    time.sleep(0.2)
    began = time.perf_counter()
    if args.began_file:
        with open(args.began_file, "w") as f:
            f.write(repr(time.time()))
    cpu0 = time.process_time()
    lateness = result.send_lateness_ms
    stalled = 0
    # Streams in PHASES groups a 20 ms / PHASES apart, as calls start at any time: the
    # server sees arrivals all through a tick, and the generator's work is spread over it
    # (each phase's lateness is measured at its own due time).
    phases = [conns[p::PHASES] for p in range(PHASES)]
    slots = AHEAD_TICKS * PHASES
    groups = [conns[g::slots] for g in range(slots)]
    for tick in range(ticks):
        work = 0.0
        for phase, members in enumerate(phases):
            due = began + (tick * FRAME_MS + phase * FRAME_MS / PHASES) / 1000
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            lateness.append(max(0.0, -delay) * 1000)
            phase_began = time.perf_counter()
            for conn in members:
                if not conn.send(conn.ahead.popleft(), PENDING_CAP):
                    stalled += 1
            # A few streams pong the server's pings and seal their next second, so every
            # slot costs about the same.
            for conn in groups[(tick * PHASES + phase) % slots]:
                conn.answer_pings()
                conn.seal_ahead(pairs, tick + 2 * AHEAD_TICKS)
            work += time.perf_counter() - phase_began
        result.tick_work_ms.append(work * 1000)
    result.schedule_cpu_s = time.process_time() - cpu0
    result.schedule_wall_s = time.perf_counter() - began
    result.stalled_writes = stalled
    result.frames_dropped = 2 * sum(c.dropped for c in conns)
    ending = stop_frame(2 * ticks + 2) + close_frame()
    for conn in conns:
        conn.sock.setblocking(True)
        conn.sock.sendall(conn.pending + conn.seal(conn.pongs + ending))
        conn.pending = b""
    # The server closes each stream once its files are finished: wait for every close.
    ended = time.perf_counter()
    deadline = time.monotonic() + 120
    for conn in conns:
        conn.sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            conn.wait_close()
            result.closed_by_server += 1
        except OSError:
            pass
        conn.sock.close()
    result.seconds = time.perf_counter() - began
    result.drain_s = time.perf_counter() - ended
    result.frames_sent = 2 * ticks * len(conns) - result.frames_dropped
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
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.streams + 64  # a socket a stream
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    result = run_paced(args) if args.mode == "paced" else asyncio.run(run(args))
    print(json.dumps(result.as_dict()), flush=True)


if __name__ == "__main__":
    main()
