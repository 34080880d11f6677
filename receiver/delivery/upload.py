"""Uploads of finished streams to an object store (obstore: S3, GCS, Azure, local files).

Key template: ``<url prefix>/<YYYY>/<MM>/<DD>/<directory>/<file>``, the date being the stream's
start in UTC. Each track file, then the stereo file if any, then ``stream.json`` last: its
presence in the store means the set is complete, and it records where every file went (the local
``stream.json`` is updated first, atomically, then uploaded). A file counts as stored only when
the store reports its size, and its MD5 where the ETag is one (S3's single-part ETag, or the
multipart form checked part by part).

Files are read once, a MiB at a time in a thread, hashed as they go and streamed to obstore
(multipart past ``part_bytes``: about ``part_bytes`` x ``concurrency`` in memory).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import obstore
from obstore.store import ObjectStore, from_url

from receiver.exceptions import ConfigError
from receiver.sinks.wav import RECORD_NAME, write_json_atomic

if TYPE_CHECKING:
    from receiver.settings import Settings

_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})(?:-(\d+))?"?$')
_READ_BYTES = 1024 * 1024
_TRACK_ORDER = ("inbound", "outbound", "stereo")


class UploadError(Exception):
    """An upload that did not complete; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def make_store(url: str, *, timeout_s: float) -> ObjectStore:
    """The store of ``RECEIVER_UPLOAD_URL``; credentials come from the store's own variables.

    Plain-HTTP endpoints (MinIO, moto on a laptop: ``AWS_ENDPOINT_URL=http://...``) are allowed
    when the endpoint says so. obstore retries once inside; our queue does the long retries.
    """
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return from_url(url, mkdir=True)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
    client_options: Any = {
        "timeout": timedelta(seconds=timeout_s),
        "connect_timeout": timedelta(seconds=min(timeout_s, 10.0)),
        "allow_http": endpoint.startswith("http://"),
    }
    retry: Any = {
        "max_retries": 1,
        "retry_timeout": timedelta(seconds=timeout_s),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=1),
            "base": 2,
        },
    }
    return from_url(url, client_options=client_options, retry_config=retry)


def store_for(settings: Settings) -> ObjectStore:
    """``make_store`` for the settings; a store obstore cannot configure is a ``ConfigError``."""
    assert settings.upload_url is not None
    try:
        return make_store(settings.upload_url, timeout_s=settings.upload_timeout_s)
    except Exception as exc:  # noqa: BLE001 - obstore's configuration errors, by any name
        raise ConfigError(
            "RECEIVER_UPLOAD_URL", f"cannot use the store: {_first_line(exc)}"
        ) from None


@dataclass(frozen=True, slots=True)
class Uploaded:
    """One stream's upload: where each file went and how many bytes."""

    objects: dict[str, str]
    bytes: int


def stream_prefix(record: dict[str, Any], directory: Path) -> str:
    """``YYYY/MM/DD/<directory>``, the date from the stream's start (UTC)."""
    started = record.get("started_at")
    try:
        when = datetime.fromisoformat(str(started)).astimezone(UTC)
    except ValueError:
        when = datetime.fromtimestamp(directory.stat().st_mtime, UTC)
    return f"{when:%Y/%m/%d}/{directory.name}"


def files_in_order(record: dict[str, Any], directory: Path) -> list[Path]:
    """The stream's audio files, tracks first then stereo; ``stream.json`` is not among them."""
    named = record.get("files") or {}
    ordered = sorted(named.items(), key=lambda kv: (*_TRACK_ORDER, kv[0]).index(kv[0]))
    found = [directory / str(name) for _, name in ordered]
    return [path for path in found if path.is_file() and path.parent == directory]


class Uploader:
    """Uploads one stream directory at a time to ``store`` (see the module docstring)."""

    def __init__(
        self, store: ObjectStore, *, base_url: str, part_bytes: int, concurrency: int
    ) -> None:
        self.store = store
        self.base_url = base_url.rstrip("/")
        self.part_bytes = part_bytes
        self.concurrency = concurrency

    async def upload_stream(self, directory: Path) -> Uploaded:
        """Upload every file of ``directory``, ``stream.json`` last; ``UploadError`` if not."""
        record_path = directory / RECORD_NAME
        try:
            record = json.loads(await asyncio.to_thread(record_path.read_text, encoding="utf-8"))
        except FileNotFoundError:
            raise UploadError("missing", f"{directory.name}: no {RECORD_NAME}") from None
        except ValueError:
            raise UploadError("unreadable", f"{directory.name}: {RECORD_NAME} unreadable") from None
        prefix = stream_prefix(record, directory)
        objects: dict[str, str] = {}
        total = 0
        for path in files_in_order(record, directory):
            total += await self._put_verified(path, f"{prefix}/{path.name}")
            objects[path.name] = f"{self.base_url}/{prefix}/{path.name}"
        objects[RECORD_NAME] = f"{self.base_url}/{prefix}/{RECORD_NAME}"
        record["upload"] = {
            "status": "uploaded",
            "url": f"{self.base_url}/{prefix}/",
            "objects": objects,
            "uploaded_at": datetime.now(UTC).isoformat(),
        }
        # The stored record says where everything went, so it is written with that first; if
        # its own upload fails, the local one must not go on saying "uploaded".
        await asyncio.to_thread(write_json_atomic, record_path, record)
        try:
            total += await self._put_verified(record_path, f"{prefix}/{RECORD_NAME}")
        except UploadError:
            del record["upload"]
            await asyncio.to_thread(write_json_atomic, record_path, record)
            raise
        return Uploaded(objects, total)

    async def _put_verified(self, path: Path, key: str) -> int:
        digest = _Digest(part_bytes=self.part_bytes)
        try:
            await obstore.put_async(
                self.store,
                key,
                _read_chunks(path, digest),
                chunk_size=self.part_bytes,
                max_concurrency=self.concurrency,
            )
            meta = await obstore.head_async(self.store, key)
        except Exception as exc:  # noqa: BLE001 - obstore raises its own tree and OSError
            message = f"{key}: {type(exc).__name__}: {_first_line(exc)}"
            raise UploadError(_reason(exc), message) from None
        md5, multipart, size = digest.result()
        if meta["size"] != size:
            raise UploadError("size_mismatch", f"{key}: stored {meta['size']} bytes, local {size}")
        match = _MD5_ETAG.match(meta.get("e_tag") or "")
        if match is not None:
            # A one-part upload's ETag is the file's MD5, a multipart one's the MD5 of the
            # parts' MD5s and their count; obstore sends a file as one part below part_bytes.
            single = match.group(2) is None
            expected = md5 if single else multipart
            got = match.group(1) + ("" if single else f"-{match.group(2)}")
            if got != expected:
                message = f"{key}: stored ETag {got}, local {expected}"
                raise UploadError("checksum_mismatch", message)
        return size


class _Digest:
    """The MD5 of a file and its S3 multipart ETag for ``part_bytes`` parts, fed chunk by
    chunk as the upload reads it (the file is read once)."""

    def __init__(self, *, part_bytes: int) -> None:
        self.part_bytes = part_bytes
        self.whole = hashlib.md5(usedforsecurity=False)
        self.part = hashlib.md5(usedforsecurity=False)
        self.in_part = 0
        self.parts: list[bytes] = []
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.whole.update(chunk)
        self.size += len(chunk)
        view = memoryview(chunk)
        while view:
            take = view[: self.part_bytes - self.in_part]
            self.part.update(take)
            self.in_part += len(take)
            view = view[len(take) :]
            if self.in_part == self.part_bytes:
                self.parts.append(self.part.digest())
                self.part, self.in_part = hashlib.md5(usedforsecurity=False), 0

    def result(self) -> tuple[str, str, int]:
        parts = [*self.parts, self.part.digest()] if self.in_part else list(self.parts)
        multipart = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
        return self.whole.hexdigest(), f"{multipart}-{len(parts)}", self.size


async def _read_chunks(path: Path, digest: _Digest) -> AsyncIterator[bytes]:
    """The file a MiB at a time, each read in a thread, each chunk added to ``digest``."""
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, _READ_BYTES):
            digest.update(chunk)
            yield chunk


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _reason(exc: BaseException) -> str:
    """A short label for the failures metric."""
    name = type(exc).__name__
    text = str(exc).lower()
    if "connect" in text or "connection" in text:
        return "unreachable"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if name in ("PermissionDeniedError", "UnauthenticatedError"):
        return "denied"
    if name == "NotFoundError":
        return "not_found"
    return "error"
