"""Signed webhook deliveries (Standard Webhooks) from the queue on disk.

Each event is POSTed as JSON ``{"type", "timestamp", "data"}`` with ``webhook-id`` (stable across
retries and restarts), ``webhook-timestamp`` (this attempt) and ``webhook-signature``. A 2xx
answer removes it from the queue; anything else (an error, a timeout, another status) is retried
with backoff. The secret is never logged, nor the URL's query.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from receiver.delivery import signing
from receiver.delivery.queue import QueueDirs, items, write_item

logger = logging.getLogger("receiver.delivery.webhooks")

EventType = Literal["stream.started", "stream.ended", "recording.uploaded"]


def event_id(token: str, event: EventType) -> str:
    """The stable id of one stream's event: a retry or a repeat after a crash keeps it."""
    return f"msg_{token}_{event.split('.')[-1]}"


def enqueue(
    dirs: QueueDirs,
    *,
    token: str,
    event: EventType,
    data: dict[str, Any],
    fresh: bool = False,
) -> bool:
    """Queue ``event`` unless an event with its id is queued already; True if queued now.

    ``fresh``: the token is new (a stream's start), so the queue need not be listed.
    """
    msg_id = event_id(token, event)
    if not fresh and any(p.name.endswith(f"-{msg_id}.json") for p in items(dirs.webhooks)):
        return False
    body = {"type": event, "timestamp": datetime.now(UTC).isoformat(), "data": data}
    write_item(dirs.webhooks / f"{time.time_ns():020d}-{msg_id}.json", {"id": msg_id, **body})
    return True


def shown_url(url: str) -> str:
    """The webhook URL as logs show it: scheme, host and path (a query may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


class WebhookSender:
    """POSTs queued events, signed; ``deliver`` says whether one was accepted."""

    def __init__(self, *, url: str, secret: str, timeout_s: float) -> None:
        self.url = url
        self._key = signing.parse_secret(secret)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), follow_redirects=False, trust_env=False
        )

    async def deliver(self, path: Path, item: dict[str, Any]) -> str | None:
        """POST one event; None when accepted (2xx), else why not (for logs and metrics)."""
        body = json.dumps(
            {k: item[k] for k in ("type", "timestamp", "data")},
            ensure_ascii=True,
            separators=(",", ":"),
        ).encode("ascii")
        headers = signing.headers(
            self._key, msg_id=str(item["id"]), timestamp_s=int(time.time()), body=body
        )
        try:
            response = await self._client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return "timeout"
        except httpx.HTTPError as exc:
            return type(exc).__name__
        if 200 <= response.status_code < 300:
            return None
        return f"http_{response.status_code}"

    async def aclose(self) -> None:
        await self._client.aclose()
