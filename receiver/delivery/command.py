"""``receiver upload [DIR...]``: upload recordings made before uploads were on (backfill), and
say what is still pending."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

from receiver.delivery.queue import QueueDirs, write_item
from receiver.delivery.upload import Uploader, UploadError, store_for
from receiver.exceptions import ConfigError
from receiver.sinks.wav import RECORD_NAME


def add_upload_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``upload`` to the main CLI's subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "upload",
        help="upload finished recordings to RECEIVER_UPLOAD_URL (backfill); report what is pending",
        description="Upload each finished stream directory (its files, stream.json last) to "
        "RECEIVER_UPLOAD_URL, skipping those already uploaded. Exit 0 when nothing is pending.",
    )
    parser.add_argument(
        "dirs",
        type=Path,
        nargs="*",
        metavar="DIR",
        help="a stream directory or a recordings directory (default: RECEIVER_RECORDINGS_DIR)",
    )
    parser.set_defaults(func=run)
    return parser


def stream_dirs(paths: list[Path]) -> list[Path]:
    """Stream directories: each path that holds a stream.json, or its children that do."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise ConfigError("DIR", f"{path} is not a directory")
        if (path / RECORD_NAME).is_file():
            found.append(path)
        else:
            found.extend(sorted(p for p in path.iterdir() if (p / RECORD_NAME).is_file()))
    return found


def run(args: argparse.Namespace) -> int:
    from receiver.settings import load_settings

    settings = load_settings()
    if settings.upload_url is None:
        raise ConfigError("RECEIVER_UPLOAD_URL", "not set: give the store, e.g. s3://bucket/prefix")
    uploader = Uploader(
        store_for(settings),
        base_url=settings.upload_url,
        part_bytes=settings.upload_part_bytes,
        concurrency=settings.upload_concurrency,
    )
    streams = stream_dirs(args.dirs or [settings.recordings_dir])
    return asyncio.run(_upload_all(uploader, streams))


def backfill_token(directory: str) -> str:
    """The queue token of a backfilled stream: the same on every run (``hash()`` is salted per
    process), so that its ``recording.uploaded`` keeps one webhook id."""
    return "b" + hashlib.sha256(directory.encode()).hexdigest()[:16]


async def _upload_all(uploader: Uploader, streams: list[Path]) -> int:
    uploaded = pending = already = 0
    for directory in streams:
        record = json.loads((directory / RECORD_NAME).read_text(encoding="utf-8"))
        if (record.get("upload") or {}).get("status") == "uploaded":
            already += 1
            continue
        marker = QueueDirs.under(directory.parent).uploads / f"{directory.name}.json"
        if record.get("status") == "recording":
            print(f"{directory}: still recording (or interrupted: run `receiver repair`)")
            pending += 1
            continue
        try:
            done = await uploader.upload_stream(directory)
        except UploadError as exc:
            # Left in the queue: a running receiver retries it.
            QueueDirs.under(directory.parent).make()
            write_item(
                marker, {"token": backfill_token(directory.name), "directory": directory.name}
            )
            print(f"{directory}: pending ({exc.reason}): {exc}")
            pending += 1
            continue
        marker.unlink(missing_ok=True)
        print(f"{directory}: uploaded {len(done.objects)} files, {done.bytes} bytes")
        uploaded += 1
    print(f"{uploaded} uploaded, {pending} pending, {already} already uploaded")
    return 0 if pending == 0 else 1
