"""WebSocket by hand: client frames, the upgrade request, and reading the server's answer, for
tests that must send what a well-behaved client never would or stop anywhere."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from typing import Any

from websockets.frames import Frame, Opcode

HOST = "127.0.0.1"  # every test talks to loopback
SERVER_NAME = "localhost"  # the name in the test certificate


def ws_frame(payload: bytes, *, opcode: int = 0x1, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 section 5.2), framed by websockets."""
    return Frame(Opcode(opcode), payload, fin=fin).serialize(mask=True)


def close_frame(code: int = 1000) -> bytes:
    return ws_frame(struct.pack("!H", code), opcode=0x8)


def upgrade_request(path: str, token: str | None) -> bytes:
    """An HTTP/1.1 WebSocket upgrade request (with a bearer token unless ``token`` is None)."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {SERVER_NAME}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_status(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The status code of an HTTP response head, and the head."""
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


async def read_head(reader: asyncio.StreamReader) -> int:
    """The status code of an HTTP response head."""
    return (await read_status(reader))[0]


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame (unmasked): its opcode and payload."""
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = struct.unpack("!H", await reader.readexactly(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", await reader.readexactly(8))[0]
    return head[0] & 0x0F, await reader.readexactly(length)


def start_frame(sid: str, encoding: str = "audio/x-mulaw", rate: int = 8000) -> str:
    """A ``start`` message for one inbound track."""
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "streamSid": sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": encoding, "sampleRate": rate, "channels": 1},
            },
        }
    )


async def read_close(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read server frames until its close frame: (code, the rest of its payload)."""
    while True:
        opcode, payload = await read_frame(reader)
        if opcode == Opcode.CLOSE:
            return struct.unpack("!H", payload[:2])[0], payload[2:]


def start_event(sid: str, rate_hz: int, tracks: list[str]) -> dict[str, Any]:
    return {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "streamSid": sid,
            "accountSid": "chaos-account",
            "callSid": "chaos-call",
            "tracks": tracks,
            "mediaFormat": {"encoding": "audio/x-L16", "sampleRate": rate_hz, "channels": 1},
        },
    }


def media_event(
    seq: int,
    track: str,
    frame: int,
    pcm: bytes,
    *,
    timestamp: bool = True,
    chunk: int | None = None,
) -> str:
    media: dict[str, str] = {"track": track, "chunk": str(frame + 1 if chunk is None else chunk)}
    if timestamp:
        media["timestamp"] = str(frame * 20)
    media["payload"] = base64.b64encode(pcm).decode()
    return json.dumps({"event": "media", "sequenceNumber": str(seq), "media": media})
