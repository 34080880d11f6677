"""The floor: a bare websockets server with the receiver's TLS and token check that only
receives. Whatever the receiver spends above this is its own cost.

    python -m bench.floor_server PORT CERT KEY TOKEN [asyncio|uvloop]

The loop option (default asyncio) gives the floor the receiver's deployed loop too, so the
two are compared with and without uvloop's share of the saving.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
import sys
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response


async def main(port: int, cert: str, key: str, token: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    expected = hashlib.sha256(f"Bearer {token}".encode()).digest()

    def check(connection: ServerConnection, request: Request) -> Response | None:
        presented = hashlib.sha256(request.headers.get("Authorization", "").encode()).digest()
        if not hmac.compare_digest(presented, expected):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "no\n")
        return None

    async def receive(ws: ServerConnection) -> None:
        async for _ in ws:
            pass

    async with serve(
        receive,
        "127.0.0.1",
        port,
        ssl=context,
        process_request=check,
        compression=None,
        max_size=65536,
    ):
        print("listening", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    loop = sys.argv[5] if len(sys.argv) > 5 else "asyncio"
    if loop not in ("asyncio", "uvloop"):
        sys.exit(f"unknown event loop {loop!r}: asyncio or uvloop")
    coroutine = main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
    if loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)
