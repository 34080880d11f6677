"""``receiver streams create | stop``: the command line over ``receiver.signalwire``.

Credentials come from flags or ``SIGNALWIRE_SPACE``, ``SIGNALWIRE_PROJECT_ID``,
``SIGNALWIRE_API_TOKEN`` (``SIGNALWIRE_API_URL`` overrides the base URL). The API token and the
bearer token are never printed. Exit codes: 0 done, 1 the API refused or did not answer,
2 invalid input or missing credentials.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from receiver.exceptions import ConfigError
from receiver.signalwire import (
    TRACKS,
    ConferenceStreamsClient,
    SignalWireError,
    StreamRequestInvalid,
    check_space,
)
from receiver.text import parse_pairs

__all__ = ["add_streams_parser", "run_streams"]


def add_streams_parser(sub: Any) -> None:
    """Add ``streams create`` and ``streams stop`` to the main parser's subcommands."""
    streams = sub.add_parser("streams", help="start or stop streaming a conference (SignalWire)")
    actions = streams.add_subparsers(dest="action", required=True)

    def credentials(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--conference", required=True, metavar="SID", help="conference sid")
        parser.add_argument("--space", help="SignalWire space name (SIGNALWIRE_SPACE)")
        parser.add_argument("--project-id", help="project id (SIGNALWIRE_PROJECT_ID)")
        parser.add_argument("--api-token", help="API token (SIGNALWIRE_API_TOKEN; prefer the env)")
        parser.add_argument("--api-url", help="base URL override (SIGNALWIRE_API_URL)")
        parser.add_argument("--cafile", type=Path, help="trust this CA for the API")
        parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")
        parser.add_argument("--json", action="store_true", help="print the stream as JSON")

    create = actions.add_parser("create", help="stream a conference to a receiver")
    credentials(create)
    create.add_argument("--url", required=True, help="the receiver's wss:// URL")
    create.add_argument("--name", help="a name unique in the conference (to stop it by)")
    create.add_argument("--track", choices=TRACKS, help="default: both_tracks")
    create.add_argument("--codec", help="PCMU (default), PCMA, L16, L16@16000h, L16@24000h")
    create.add_argument("--real-time", action="store_true", default=None, help="StreamRealTime")
    create.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="a custom parameter, repeatable (at most 99)",
    )
    create.add_argument(
        "--bearer-token", help="token the platform presents (default: first of RECEIVER_TOKENS)"
    )
    create.add_argument(
        "--status-callback",
        help="URL told when the stream starts, stops or fails (default: RECEIVER_PUBLIC_URL + "
        "RECEIVER_STATUS_PATH when a public URL is set; '' for none)",
    )
    create.add_argument(
        "--status-callback-method",
        choices=["GET", "POST"],
        help="the HTTP method it is called with",
    )
    create.set_defaults(func=run_streams)

    stop = actions.add_parser("stop", help="stop a conference stream")
    credentials(stop)
    which = stop.add_mutually_exclusive_group(required=True)
    which.add_argument("--sid", help="the stream's sid")
    which.add_argument("--name", help="the stream's name")
    stop.set_defaults(func=run_streams)


def run_streams(args: argparse.Namespace) -> int:
    """Run ``streams create`` or ``streams stop``; returns the exit code."""
    try:
        client = _client(args)
        with client:
            if args.action == "create":
                bearer_token = args.bearer_token or _receiver_token()
                if bearer_token is None:
                    raise StreamRequestInvalid(
                        "--bearer-token",
                        "give it, or set RECEIVER_TOKENS: without one the platform would "
                        "connect with no token and the receiver would refuse it (401)",
                    )
                status_callback = args.status_callback
                if status_callback is None:
                    status_callback = _receiver_status_callback()
                stream = client.create(
                    conference_sid=args.conference,
                    url=args.url,
                    name=args.name,
                    track=args.track,
                    codec=args.codec,
                    real_time=args.real_time,
                    parameters=_params(args.param),
                    bearer_token=bearer_token,
                    status_callback=status_callback or None,
                    status_callback_method=args.status_callback_method,
                )
            else:
                stream = client.stop(conference_sid=args.conference, stream=args.sid or args.name)
    except StreamRequestInvalid as exc:
        print(f"receiver streams: {exc}", file=sys.stderr)
        return 2
    except SignalWireError as exc:
        print(f"receiver streams: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stream.as_dict(), indent=2))
    else:
        verb = "created" if args.action == "create" else "updated"
        print(f"{verb} stream {stream.sid} (name {stream.name}): {stream.status}")
        if stream.uri:
            print(f"  uri: {stream.uri}")
        if args.action == "create" and status_callback:
            print(f"  status callbacks: {status_callback}")
    return 0


def _client(args: argparse.Namespace) -> ConferenceStreamsClient:
    """The client from flags and ``SIGNALWIRE_*``; every missing credential named at once."""
    project_id = args.project_id or os.environ.get("SIGNALWIRE_PROJECT_ID")
    api_token = args.api_token or os.environ.get("SIGNALWIRE_API_TOKEN")
    space = args.space or os.environ.get("SIGNALWIRE_SPACE")
    api_url = args.api_url or os.environ.get("SIGNALWIRE_API_URL")
    missing = [
        name
        for name, value in (
            ("SIGNALWIRE_PROJECT_ID (or --project-id)", project_id),
            ("SIGNALWIRE_API_TOKEN (or --api-token)", api_token),
            ("SIGNALWIRE_SPACE (or --space, or SIGNALWIRE_API_URL)", space or api_url),
        )
        if not value
    ]
    if missing or not project_id or not api_token:
        raise StreamRequestInvalid("credentials", "set " + ", ".join(missing))
    if space and not api_url:
        try:
            check_space(space)
        except StreamRequestInvalid as exc:
            raise StreamRequestInvalid("SIGNALWIRE_SPACE (--space)", exc.problem) from None
    if args.cafile is not None and not args.cafile.is_file():
        raise StreamRequestInvalid("--cafile", f"no such file: {args.cafile}")
    return ConferenceStreamsClient(
        project_id=project_id,
        api_token=api_token,
        space=space,
        api_url=api_url,
        cafile=args.cafile,
        timeout_s=args.timeout,
    )


def _params(pairs: list[str]) -> list[tuple[str, str]]:
    try:
        return parse_pairs(pairs)
    except ValueError as exc:
        raise StreamRequestInvalid("--param", str(exc)) from None


def _receiver_status_callback() -> str | None:
    """RECEIVER_PUBLIC_URL + RECEIVER_STATUS_PATH, so that one command wires both directions."""
    from receiver.settings import load_settings

    try:
        return load_settings().status_callback_url
    except ConfigError as exc:
        if exc.variable in ("RECEIVER_PUBLIC_URL", "RECEIVER_STATUS_PATH"):
            raise StreamRequestInvalid(exc.variable, exc.problem) from None
        return None


def _receiver_token() -> str | None:
    """The first of the receiver's own RECEIVER_TOKENS, so both sides agree by default."""
    from receiver.settings import load_settings

    try:
        tokens = load_settings().token_values
    except ConfigError as exc:
        if exc.variable == "RECEIVER_TOKENS":
            raise  # an invalid token is worth saying (it is never echoed)
        return None
    return tokens[0] if tokens else None
