"""Play audio into a receiver exactly as the platform does: connected, start, media, stop.

``build_messages`` makes the JSON text frames (pure); ``play`` sends them over a real
WebSocket. Tests use both; people use ``receiver simulate`` to check a deployment.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)

from receiver.auth import redact_websockets_logs
from receiver.codecs import Codec
from receiver.events import Track
from receiver.exceptions import ConnectFailed

__all__ = ["Layout", "PlayResult", "build_messages", "frame_messages", "play", "progress_bar"]

Layout = Literal["signalwire", "twilio"]


@dataclass(frozen=True, slots=True)
class PlayResult:
    """How the server ended the connection, and what was sent."""

    close_code: int | None
    close_reason: str | None
    messages_sent: int


def frame_messages(
    *,
    codec: Codec,
    tracks: Mapping[Track, bytes],
    frame_ms: int = 20,
    stream_sid: str | None = None,
    drop: Mapping[Track, Collection[int]] | None = None,
    layout: Layout = "signalwire",
    first_sequence_number: int = 2,
) -> list[str]:
    """``media`` messages for already-encoded audio, both tracks interleaved in time.

    Each track is cut into ``frame_ms`` frames (the last may be shorter); frame ``i`` has
    ``chunk`` ``i + 1`` and ``timestamp`` its start in ms. Chunks listed in ``drop[track]`` are
    left out, as if lost on the way, so the receiver sees the chunk and timestamp jump.
    """
    bytes_per_frame = codec.sample_rate_hz * frame_ms // 1000 * codec.bytes_per_sample
    frames = {
        t: len(data) // bytes_per_frame + bool(len(data) % bytes_per_frame)
        for t, data in tracks.items()
    }
    drop = drop or {}
    messages: list[str] = []
    sequence = first_sequence_number
    for i in range(max(frames.values(), default=0)):
        for track, data in tracks.items():
            chunk = i + 1
            if i >= frames[track] or chunk in drop.get(track, ()):
                continue
            payload = data[i * bytes_per_frame : (i + 1) * bytes_per_frame]
            message: dict[str, Any] = {
                "event": "media",
                "sequenceNumber": str(sequence),
                "media": {
                    "track": track,
                    "chunk": str(chunk),
                    "timestamp": str(i * frame_ms),
                    "payload": base64.b64encode(payload).decode("ascii"),
                },
            }
            if layout == "twilio":
                message["streamSid"] = stream_sid
            messages.append(json.dumps(message))
            sequence += 1
    return messages


def build_messages(
    *,
    codec: Codec,
    tracks: Mapping[Track, bytes],
    frame_ms: int = 20,
    stream_sid: str | None = None,
    account_sid: str | None = None,
    call_sid: str | None = None,
    custom_parameters: Mapping[str, str] | None = None,
    drop: Mapping[Track, Collection[int]] | None = None,
    layout: Layout = "signalwire",
    stop: bool = True,
) -> list[str]:
    """The whole stream as the platform sends it: connected, start, media..., stop."""
    stream_sid = stream_sid or str(uuid.uuid4())
    twilio = layout == "twilio"
    start: dict[str, Any] = {
        "streamSid": stream_sid,
        "accountSid": account_sid or ("AC" + uuid.uuid4().hex if twilio else str(uuid.uuid4())),
        "callSid": call_sid or ("CA" + uuid.uuid4().hex if twilio else str(uuid.uuid4())),
        "tracks": list(tracks),
        "mediaFormat": {
            "encoding": codec.media_format.encoding,
            "sampleRate": codec.sample_rate_hz,
            "channels": 1,
        },
    }
    if custom_parameters:
        start["customParameters"] = dict(custom_parameters)
    connected = {
        "event": "connected",
        "protocol": "Call",
        "version": "1.0.0" if twilio else "0.2.0",
    }
    start_message: dict[str, Any] = {"event": "start", "sequenceNumber": "1", "start": start}
    if twilio:
        start_message["streamSid"] = stream_sid
    media = frame_messages(
        codec=codec,
        tracks=tracks,
        frame_ms=frame_ms,
        stream_sid=stream_sid,
        drop=drop,
        layout=layout,
    )
    messages = [json.dumps(connected), json.dumps(start_message), *media]
    if stop:
        stop_message: dict[str, Any] = {"event": "stop", "sequenceNumber": str(len(media) + 2)}
        if twilio:
            stop_message["streamSid"] = stream_sid
            stop_message["stop"] = {"accountSid": start["accountSid"], "callSid": start["callSid"]}
        messages.append(json.dumps(stop_message))
    return messages


async def play(
    url: str,
    messages: Iterable[str],
    *,
    token: str | None,
    ssl_context: ssl.SSLContext | None = None,
    pace: float = 0.0,
    close_timeout_s: float = 10.0,
    open_timeout_s: float = 10.0,
    progress: Callable[[int, int], None] | None = None,
) -> PlayResult:
    """Send ``messages`` over one WebSocket, as the platform would, and wait for the close.

    With ``pace`` each media message goes out ``pace`` wall-clock seconds per second of its
    ``media.timestamp`` after the first (1.0: real time, 2.0: half speed; 0: at once). The
    timestamp, not a count of messages, sets the pace, so a stream keeps its speed after its
    shorter track has ended. After a ``stop`` the client waits for the server to close, which
    it does once every file is finished; without one it closes the connection itself, like a
    hang-up. ``progress(sent, total)`` is called after each message. A receiver that cannot
    be reached or refuses the handshake raises ``ConnectFailed`` with a one-line reason.
    """
    messages = list(messages)
    redact_websockets_logs()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    sent = 0
    saw_stop = False
    loop = asyncio.get_running_loop()
    try:
        ws = await connect(
            url,
            additional_headers=headers,
            ssl=ssl_context if url.startswith("wss:") else None,
            compression=None,
            max_size=None,
            open_timeout=open_timeout_s,
            close_timeout=close_timeout_s,
        )
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        raise ConnectFailed(url, connect_problem(url, exc, open_timeout_s=open_timeout_s)) from None
    async with ws:
        started = loop.time()
        try:
            for message in messages:
                event, timestamp_ms = _event_and_timestamp(message)
                if pace and timestamp_ms is not None:
                    delay = started + timestamp_ms / 1000 * pace - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await ws.send(message)
                sent += 1
                if progress is not None:
                    progress(sent, len(messages))
                saw_stop = saw_stop or event == "stop"
            if saw_stop:
                async with asyncio.timeout(close_timeout_s):
                    await ws.wait_closed()
        except ConnectionClosed:
            pass
    return PlayResult(ws.close_code, ws.close_reason, sent)


def connect_problem(url: str, exc: BaseException, *, open_timeout_s: float) -> str:
    """Why ``connect(url)`` failed, in one line with what to do about it."""
    target = urlsplit(url)
    where = f"{target.hostname}:{target.port or (443 if target.scheme == 'wss' else 80)}"
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status == 401:
            return "the receiver refused the bearer token (HTTP 401): check --token/RECEIVER_TOKENS"
        return f"the receiver refused the stream with HTTP {status}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the certificate of {where} is not trusted ({exc.verify_message}): pass --cafile "
            "with the receiver's certificate or its CA (a development receiver's is "
            ".receiver/dev-cert.pem where it runs)"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS with {where} failed ({exc.reason or exc}): is it a wss:// (TLS) port?"
    if isinstance(exc, InvalidMessage):
        hint = " (a TLS port? use wss://)" if target.scheme == "ws" else ""
        return f"{where} did not answer the upgrade as a WebSocket server{hint}"
    if isinstance(exc, InvalidURI):
        return "not a ws:// or wss:// URL"
    if isinstance(exc, TimeoutError):
        return f"no WebSocket handshake with {where} within {open_timeout_s:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens on {where} (is `receiver serve` running there?)"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"the WebSocket handshake with {where} failed: {exc}"


def progress_bar(sent: int, total: int, *, seconds: float, width: int = 30) -> str:
    """One line of progress: ``[#####.....]  50%  3.0 / 6.0 s``."""
    done = sent / total if total else 1.0
    filled = int(done * width)
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {done:4.0%}"
        f"  {done * seconds:5.1f} / {seconds:.1f} s"
    )


def _event_and_timestamp(message: str) -> tuple[str | None, int | None]:
    """The message's ``event``, and ``media.timestamp`` in ms for a media message."""
    try:
        value = json.loads(message)
    except ValueError:
        return None, None
    if not isinstance(value, dict):
        return None, None
    event = value.get("event")
    media = value.get("media")
    timestamp = media.get("timestamp") if event == "media" and isinstance(media, dict) else None
    try:
        return event, None if timestamp is None else int(timestamp)
    except (TypeError, ValueError):
        return event, None
