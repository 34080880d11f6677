"""``Delivery``: the per-process owner of uploads and webhooks, and the sink that feeds it.

The sink's ``open`` puts a marker for the stream and its ``stream.started`` event on disk; its
``aclose`` (after the files are finished) resolves the marker into an upload and a
``stream.ended`` event. Two background tasks work the queues, off every stream's path: object
store I/O is obstore's async API, file reads and queue writes run in threads. On ``start``,
streams a crash interrupted are repaired (``receiver.recovery``) and their markers resolved, so
a ``kill -9`` loses no upload and no event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from prometheus_client import Counter, Gauge, Histogram

from receiver.delivery import webhooks
from receiver.delivery.queue import Backoff, QueueDirs, items, read_item, write_item
from receiver.delivery.upload import Uploader, UploadError, store_for
from receiver.events import Track
from receiver.session import DtmfRecord, MarkRecord
from receiver.sinks.base import StreamInfo, StreamSummary
from receiver.sinks.wav import RECORD_NAME, safe_dirname

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from receiver.settings import Settings

logger = logging.getLogger("receiver.delivery")


def event_data(record: dict[str, Any]) -> dict[str, Any]:
    """What a webhook tells about a stream, from its ``stream.json`` record."""
    keep = (
        "stream_sid", "call_sid", "account_sid", "custom_parameters", "media_format", "codec",
        "started_at", "ended_at", "end", "status", "tracks", "files", "upload",
        # What the platform's status callbacks said (receiver.status), when they are heard.
        "conference_sid", "stream_name", "platform_call_sid", "platform_events",
    )  # fmt: skip
    data = {key: record[key] for key in keep if key in record}
    data["directory"] = record.get("directory")
    return data


class DeliveryMetrics:
    """Upload and webhook figures, in the receiver's registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw: Any = {"registry": registry}
        self.uploads_pending = Gauge(
            "receiver_uploads_pending", "Streams waiting for upload.", **kw
        )
        self.uploaded = Counter("receiver_uploads", "Streams uploaded and verified.", **kw)
        self.upload_failures = Counter(
            "receiver_upload_failures", "Upload attempts that failed, by reason.", ["reason"], **kw
        )
        self.upload_bytes = Counter("receiver_upload_bytes", "Bytes uploaded and verified.", **kw)
        self.upload_seconds = Histogram(
            "receiver_upload_duration_seconds",
            "Time to upload one stream's files.",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
            **kw,
        )
        self.webhooks_pending = Gauge(
            "receiver_webhooks_pending", "Events not yet delivered.", **kw
        )
        self.webhooks_delivered = Counter("receiver_webhooks_delivered", "Events delivered.", **kw)
        self.webhook_failures = Counter(
            "receiver_webhook_failures",
            "Delivery attempts that failed, by reason.",
            ["reason"],
            **kw,
        )


class Delivery:
    """Uploads (``RECEIVER_UPLOAD_URL``) and webhooks (``RECEIVER_WEBHOOK_URL``) of one process:
    a sink factory with a lifecycle (``receiver.sinks.base.Lifecycle``)."""

    def __init__(self) -> None:
        self.dirs: QueueDirs | None = None
        self.uploader: Uploader | None = None
        self.sender: webhooks.WebhookSender | None = None
        self.metrics: DeliveryMetrics | None = None
        self.delete_local = False
        self._upload_backoff = Backoff(1.0, 300.0)
        self._webhook_backoff = Backoff(1.0, 300.0)
        self._upload_wake = asyncio.Event()
        self._webhook_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._passed = asyncio.Condition()
        self.recordings_dir: Path | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, settings: Settings, *, registry: CollectorRegistry) -> None:
        """Open the queue, resume what a crash left, start the two workers."""
        self.recordings_dir = settings.recordings_dir
        self.dirs = QueueDirs.under(settings.recordings_dir)
        await asyncio.to_thread(self.dirs.make)
        self.metrics = DeliveryMetrics(registry)
        # Read at scrape time: the queue is the directory.
        self.metrics.uploads_pending.set_function(lambda: self.pending()[0])
        self.metrics.webhooks_pending.set_function(lambda: self.pending()[1])
        self.delete_local = settings.upload_delete_local
        first, cap = settings.delivery_retry_first_s, settings.delivery_retry_max_s
        self._upload_backoff = Backoff(first, cap)
        self._webhook_backoff = Backoff(first, cap)
        if settings.upload_url is not None:
            self.uploader = Uploader(
                store_for(settings),
                base_url=settings.upload_url,
                part_bytes=settings.upload_part_bytes,
                concurrency=settings.upload_concurrency,
            )
        if settings.webhook_url is not None and settings.webhook_secret is not None:
            # httpx logs each request's whole URL at INFO, and a webhook URL's query may hold
            # a token: its request lines stay out of our logs (our own line shows no query).
            httpx_logger = logging.getLogger("httpx")
            if httpx_logger.level == logging.NOTSET:
                httpx_logger.setLevel(logging.WARNING)
            self.sender = webhooks.WebhookSender(
                url=settings.webhook_url,
                secret=settings.webhook_secret.get_secret_value(),
                timeout_s=settings.webhook_timeout_s,
            )
        await asyncio.to_thread(self._resume)
        if self.uploader is not None:
            self._tasks.append(asyncio.create_task(self._upload_worker(), name="receiver-upload"))
        if self.sender is not None:
            self._tasks.append(
                asyncio.create_task(self._webhook_worker(), name="receiver-webhooks")
            )

    async def stop(self) -> None:
        """Stop the workers; what is pending stays on disk for the next start."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.sender is not None:
            await self.sender.aclose()

    def __call__(self, settings: Settings) -> DeliverySink:
        return DeliverySink(self)

    def pending(self) -> tuple[int, int]:
        """Streams waiting for upload and events waiting for delivery (counts on disk)."""
        if self.dirs is None:
            return 0, 0
        return len(items(self.dirs.uploads)), len(items(self.dirs.webhooks))

    async def wait_delivered(self) -> None:
        """Until nothing is pending (tests, and a program that wants to exit after a backfill)."""
        async with self._passed:
            await self._passed.wait_for(
                lambda: (
                    self.dirs is not None
                    and not items(self.dirs.streams)
                    and self.pending() == (0, 0)
                )
            )

    async def _notify_pass(self) -> None:
        async with self._passed:
            self._passed.notify_all()

    # --- what the sinks tell ---------------------------------------------------------------

    def stream_opened(self, token: str, info: StreamInfo) -> None:
        """A stream started: its marker and ``stream.started`` go to disk (two small files)."""
        assert self.dirs is not None, "delivery not started"
        data = info.as_dict()
        marker = {
            "token": token,
            "stream_sid": data["stream_sid"],
            "started_at": data["started_at"],
        }
        write_item(self.dirs.streams / f"{token}.json", marker)
        if self.sender is not None:
            keep = ("stream_sid", "call_sid", "account_sid", "custom_parameters", "media_format")
            started = {key: data[key] for key in keep} | {"started_at": data["started_at"]}
            webhooks.enqueue(
                self.dirs, token=token, event="stream.started", data=started, fresh=True
            )
            self._webhook_wake.set()

    async def stream_finished(
        self, token: str, directory: Path | None, *, fallback: dict[str, Any]
    ) -> None:
        """The stream's files are finished: queue its upload and ``stream.ended``.

        ``fallback`` describes the stream when no record sink wrote a ``stream.json``.
        """
        await asyncio.to_thread(self._resolve, token, directory, fallback)
        self._upload_wake.set()
        self._webhook_wake.set()

    # --- the queue -------------------------------------------------------------------------

    def _resolve(self, token: str, directory: Path | None, fallback: dict[str, Any]) -> None:
        """Turn a stream marker into an upload item and a ``stream.ended`` event (a thread)."""
        assert self.dirs is not None
        record = (_read_record(directory) if directory is not None else {}) or dict(fallback)
        record["directory"] = directory.name if directory is not None else None
        if self.sender is not None:
            webhooks.enqueue(self.dirs, token=token, event="stream.ended", data=event_data(record))
        if self.uploader is not None and directory is not None:
            item = {"token": token, "directory": directory.name}
            write_item(self.dirs.uploads / f"{directory.name}.json", item)
        (self.dirs.streams / f"{token}.json").unlink(missing_ok=True)

    def _resume(self) -> None:
        """At start-up: repair interrupted streams and resolve the markers a crash left."""
        assert self.dirs is not None and self.recordings_dir is not None
        from receiver.recovery import repair

        repaired = repair(self.recordings_dir)
        if repaired:
            logger.info("repaired %d interrupted stream(s) before delivering them", len(repaired))
        for path in items(self.dirs.streams):
            marker = read_item(path)
            if marker is None:
                path.unlink(missing_ok=True)
                continue
            directory = self._find_directory(marker)
            logger.info("resuming delivery of stream %s after a restart", path.stem)
            fallback: dict[str, Any] = {
                k: marker[k] for k in ("stream_sid", "started_at") if k in marker
            }
            fallback["end"] = {"kind": "interrupted", "close_code": None, "reason": None}
            self._resolve(str(marker.get("token", path.stem)), directory, fallback)

    def _find_directory(self, marker: dict[str, Any]) -> Path | None:
        """The recording a marker stands for: same sid, same start time."""
        assert self.recordings_dir is not None
        base = safe_dirname(str(marker.get("stream_sid", "")))
        for candidate in sorted(self.recordings_dir.glob(f"{base}*")):
            record = _read_record(candidate)
            if record and record.get("started_at") == marker.get("started_at"):
                return candidate
        return None

    async def _upload_worker(self) -> None:
        assert self.dirs is not None and self.uploader is not None and self.metrics is not None
        while True:
            self._upload_wake.clear()
            pending = await asyncio.to_thread(items, self.dirs.uploads)
            self._upload_backoff.retain({path.name for path in pending})
            for path in pending:
                if self._upload_backoff.ready(path.name):
                    await self._upload_one(path)
            await self._notify_pass()
            await _wait(self._upload_wake, self._upload_backoff.next_due_s())

    async def _upload_one(self, path: Path) -> None:
        assert self.dirs is not None and self.uploader is not None and self.metrics is not None
        item = await asyncio.to_thread(read_item, path)
        if item is None or self.recordings_dir is None:
            return
        directory = self.recordings_dir / str(item.get("directory", ""))
        started = time.monotonic()
        try:
            done = await self.uploader.upload_stream(directory)
        except UploadError as exc:
            if exc.reason == "missing":
                # The directory is gone (deleted by hand): there is nothing left to upload.
                logger.error("not uploading %s: %s; dropping it from the queue", directory, exc)
                self.metrics.upload_failures.labels(exc.reason).inc()
                await asyncio.to_thread(path.unlink, missing_ok=True)
                return
            self.metrics.upload_failures.labels(exc.reason).inc()
            delay = self._upload_backoff.failed(path.name)
            attempts = self._upload_backoff.attempts[path.name]
            logger.warning(
                "upload of %s failed (attempt %d, again in %.1f s): %s",
                directory.name, attempts, delay, exc,
            )  # fmt: skip
            return
        seconds = time.monotonic() - started
        self._upload_backoff.succeeded(path.name)
        self.metrics.uploaded.inc()
        self.metrics.upload_bytes.inc(done.bytes)
        self.metrics.upload_seconds.observe(seconds)
        logger.info(
            "uploaded %s: %d files, %d bytes in %.1f s to %s",
            directory.name, len(done.objects), done.bytes, seconds,
            done.objects[RECORD_NAME].rsplit("/", 1)[0] + "/",
        )  # fmt: skip
        if self.sender is not None:
            record = await asyncio.to_thread(_read_record, directory)
            record["directory"] = directory.name
            token = str(item.get("token", directory.name))
            await asyncio.to_thread(
                webhooks.enqueue,
                self.dirs,
                token=token,
                event="recording.uploaded",
                data=event_data(record),
            )
            self._webhook_wake.set()
        if self.delete_local:  # before the item goes: until then the stream is not delivered
            await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def _webhook_worker(self) -> None:
        assert self.dirs is not None and self.sender is not None and self.metrics is not None
        while True:
            self._webhook_wake.clear()
            pending = await asyncio.to_thread(items, self.dirs.webhooks)
            self._webhook_backoff.retain({path.name for path in pending})
            for path in pending:
                if not self._webhook_backoff.ready(path.name):
                    continue
                item = await asyncio.to_thread(read_item, path)
                if item is None:
                    continue
                why = await self.sender.deliver(path, item)
                if why is None:
                    self._webhook_backoff.succeeded(path.name)
                    self.metrics.webhooks_delivered.inc()
                    await asyncio.to_thread(path.unlink, missing_ok=True)
                    logger.info("webhook %s %s delivered", item.get("type"), item.get("id"))
                    continue
                self.metrics.webhook_failures.labels(why).inc()
                delay = self._webhook_backoff.failed(path.name)
                logger.warning(
                    "webhook %s %s to %s failed (%s), again in %.1f s",
                    item.get("type"), item.get("id"), webhooks.shown_url(self.sender.url),
                    why, delay,
                )  # fmt: skip
            await self._notify_pass()
            await _wait(self._webhook_wake, self._webhook_backoff.next_due_s())


async def _wait(wake: asyncio.Event, timeout_s: float | None) -> None:
    """Until woken, or until the next retry is due."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await wake.wait()


def _read_record(directory: Path) -> dict[str, Any]:
    """A stream's ``stream.json``, or ``{}`` when it is missing, unreadable or not an object."""
    try:
        value = json.loads((directory / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class DeliverySink:
    """One stream's side of ``Delivery``: no audio, only the stream's start and end. It closes
    after the record sink (``delivers_record``), once the files are finished."""

    location: str | None = None
    writes_record = False
    delivers_record = True
    observer = True  # it records nothing: a stream whose recording sinks all failed is failed

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self._token: str | None = None
        self._info: StreamInfo | None = None

    def open(self, info: StreamInfo) -> None:
        self._token = secrets.token_hex(8)
        self._info = info
        self._delivery.stream_opened(self._token, info)

    def write(self, track: Track, position: int, samples: NDArray[np.int16]) -> None:
        """Audio is the other sinks' business."""

    def event(self, record: DtmfRecord | MarkRecord) -> None:
        """Events reach webhooks through ``stream.json``."""

    def close(self, summary: StreamSummary) -> None:
        """Without an event loop (a program driving sinks itself): nothing is delivered."""

    async def aclose(self, summary: StreamSummary) -> None:
        """The files are finished (``summary.directory``): queue the upload and the event."""
        if self._token is not None and self._info is not None:
            fallback = {**self._info.as_dict(), **summary.as_dict()}
            await self._delivery.stream_finished(self._token, summary.directory, fallback=fallback)
