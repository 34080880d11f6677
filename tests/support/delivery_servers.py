"""Real servers for the delivery tests: moto's S3 in server mode (its own process, so its
memory is not ours), and a webhook receiver that answers as a test tells it."""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.support.commands import free_port

BUCKET = "recordings"
# 32 random bytes, base64: a Standard Webhooks secret as users generate them.
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw5h6hdQ3jYNs="


class MotoServer:
    """``moto_server`` on a free loopback port; ``stop`` and ``start`` again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().list_buckets()
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.1)
        self.client().create_bucket(Bucket=BUCKET)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )

    def objects(self) -> dict[str, bytes]:
        """Every object of the bucket, by key."""
        s3 = self.client()
        listed = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
        return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}

    def env(self) -> dict[str, str]:
        """The variables obstore reads, as a user sets them for MinIO or R2."""
        return {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.url,
        }


@pytest.fixture
def moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """An S3 server of this test, its variables set in this process."""
    server = MotoServer(tmp_path)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()


class WebhookServer:
    """An HTTP server recording every POST; for each webhook-id it answers ``statuses`` in
    turn, then 200."""

    def __init__(self, statuses: list[int] | None = None, *, port: int | None = None) -> None:
        self.statuses = list(statuses or [])
        self.seen: dict[str, int] = {}
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.changed = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with outer.changed:
                    msg_id = self.headers.get("webhook-id", "")
                    n = outer.seen[msg_id] = outer.seen.get(msg_id, 0) + 1
                    status = outer.statuses[n - 1] if n <= len(outer.statuses) else 200
                    outer.received.append((dict(self.headers.items()), body, status))
                    outer.changed.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks?token=t0ken"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        with self.changed:
            return [(h, b) for h, b, status in self.received if status == 200]

    async def wait_for(self, count: int, *, timeout_s: float = 60) -> None:
        """Until ``count`` deliveries were accepted."""

        def wait() -> None:
            with self.changed:
                ok = self.changed.wait_for(lambda: len(self.accepted()) >= count, timeout_s)
                assert ok, self.received

        await asyncio.to_thread(wait)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
