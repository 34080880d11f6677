"""The usual tutorial-style recorder, for comparison: json.loads, base64 and a numpy μ-law
decode per frame, and a soundfile write per frame to a WAV per track.

    python -m bench.tutorial_server PORT CERT KEY TOKEN RECORDINGS_DIR
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import sys
from http import HTTPStatus
from pathlib import Path

import numpy as np
import soundfile
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response


def mulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


async def main(port: int, cert: str, key: str, token: str, recordings: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    table = mulaw_table()
    root = Path(recordings)

    def check(connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Authorization") != f"Bearer {token}":
            return connection.respond(HTTPStatus.UNAUTHORIZED, "no\n")
        return None

    async def record(ws: ServerConnection) -> None:
        files: dict[str, soundfile.SoundFile] = {}
        sid = "unknown"
        try:
            async for message in ws:
                data = json.loads(message)
                if data["event"] == "start":
                    sid = data["start"]["streamSid"]
                    (root / sid).mkdir(parents=True, exist_ok=True)
                elif data["event"] == "media":
                    track = data["media"]["track"]
                    samples = table[
                        np.frombuffer(base64.b64decode(data["media"]["payload"]), np.uint8)
                    ]
                    if track not in files:
                        files[track] = soundfile.SoundFile(
                            root / sid / f"{track}.wav", "w", 8000, 1, "PCM_16"
                        )
                    files[track].write(samples)
                elif data["event"] == "stop":
                    break
        finally:
            for file in files.values():
                file.close()

    async with serve(record, "127.0.0.1", port, ssl=context, process_request=check, max_size=65536):
        print("listening", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]))
