"""The ``receiver consume`` command line: options, settings, signals, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import redis

from receiver.consume.worker import DEFAULT_GROUP, ConsumeOptions, Consumer
from receiver.exceptions import ConfigError
from receiver.settings import Settings

DEFAULT_URL = Settings.model_fields["redis_url"].default.get_secret_value()
DEFAULT_PREFIX = Settings.model_fields["redis_prefix"].default
_SCHEMES = ("redis", "rediss", "unix")


def add_consume_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``consume`` to the main CLI's subcommands; it dispatches to ``run``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "consume",
        help="rebuild streams from Redis as WAV files (a worker of a consumer group)",
        description="Rebuild streams the redis sink published as WAV files, as one worker of a "
        "consumer group (docs/redis.md).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``receiver consume``."""
    parser.add_argument("--url", help=f"Redis URL (RECEIVER_REDIS_URL, default {DEFAULT_URL})")
    parser.add_argument(
        "--prefix", help=f"key prefix (RECEIVER_REDIS_PREFIX, default {DEFAULT_PREFIX})"
    )
    parser.add_argument("--group", default=DEFAULT_GROUP, help=f"default {DEFAULT_GROUP}")
    parser.add_argument(
        "--consumer",
        help="this worker's name in the group (default: host-pid); keep it stable"
        " across restarts to resume its streams at once",
    )
    parser.add_argument(
        "--output-dir", "-o", type=Path, help="write <stream_id>/{inbound,outbound}.wav here"
    )
    parser.add_argument(
        "--levels", action="store_true", help="print each track's level once a second"
    )
    parser.add_argument(
        "--count", type=int, default=0, help="exit after finishing this many streams"
    )
    parser.add_argument("--block-ms", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument(
        "--claim-idle-s",
        type=float,
        default=60.0,
        help="take over streams of a worker silent this long (default 60)",
    )
    parser.add_argument(
        "--stream-timeout-s",
        type=float,
        default=120.0,
        help="finish a stream with no entry for this long as incomplete (default 120)",
    )
    parser.add_argument(
        "--new-only",
        action="store_true",
        help="a new group starts at new streams instead of every stream still in Redis",
    )


def options_from_args(args: argparse.Namespace) -> ConsumeOptions:
    """Options from the command line, with the URL and prefix from settings when not given."""
    if args.output_dir is None and not args.levels:
        raise ConfigError("--output-dir", "give --output-dir DIR, --levels, or both")
    url, prefix = args.url, args.prefix
    if url is None or prefix is None:
        from receiver.settings import load_settings

        settings = load_settings()
        url = url if url is not None else settings.redis_url.get_secret_value()
        prefix = prefix if prefix is not None else settings.redis_prefix
    if urlsplit(url).scheme not in _SCHEMES:
        # The URL itself is not echoed: it may hold a password.
        raise ConfigError("--url", "must be a redis://, rediss:// or unix:// URL")
    return ConsumeOptions(
        url=url,
        prefix=prefix,
        group=args.group,
        consumer=args.consumer or f"{socket.gethostname()}-{os.getpid()}",
        output_dir=args.output_dir,
        levels=args.levels,
        count=max(0, args.count),
        block_ms=max(10, args.block_ms),
        claim_idle_s=max(1.0, args.claim_idle_s),
        stream_timeout_s=max(1.0, args.stream_timeout_s),
        new_only=args.new_only,
    )


def run(args: argparse.Namespace) -> int:
    """``receiver consume``: work until SIGINT/SIGTERM (or ``--count`` streams); exit code."""
    options = options_from_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    try:
        client = redis.Redis.from_url(
            options.url,
            # A blocking read must not look like a dead server.
            socket_timeout=options.block_ms / 1000 + 10,
            socket_connect_timeout=5,
        )
    except ValueError:
        raise ConfigError("--url", "is not a Redis URL redis-py can use") from None
    consumer = Consumer(client, options)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        consumer.stop()

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        return consumer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        client.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m receiver.consume``: the same as ``receiver consume``."""
    parser = argparse.ArgumentParser(prog="receiver consume", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as exc:
        print(f"receiver consume: {exc}", file=sys.stderr)
        return 2
