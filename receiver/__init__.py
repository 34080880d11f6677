"""receiver: a wss endpoint that records SignalWire (Twilio-compatible) media streams.

The public API is ``__all__`` below (``tests/test_exports.py`` checks it); every other name,
and every module not reached through these, is internal and may change. Names are imported on
first use, so that ``import receiver`` (and the command line's start-up) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Exported name -> the module that defines it.
_EXPORTS = {
    "ApiError": "receiver.signalwire",
    "ApiUnreachable": "receiver.signalwire",
    "AudioBatch": "receiver.session",
    "ConferenceStream": "receiver.signalwire",
    "ConferenceStreamsClient": "receiver.signalwire",
    "ConfigError": "receiver.exceptions",
    "ConnectFailed": "receiver.exceptions",
    "DtmfRecord": "receiver.session",
    "LimitExceeded": "receiver.exceptions",
    "LiveAudio": "receiver.live",
    "LiveStream": "receiver.live",
    "MalformedMessage": "receiver.exceptions",
    "MarkRecord": "receiver.session",
    "MemorySink": "receiver.sinks.memory",
    "ProtocolError": "receiver.exceptions",
    "Receiver": "receiver.server",
    "ReceiverError": "receiver.exceptions",
    "RecordingFailed": "receiver.exceptions",
    "Settings": "receiver.settings",
    "SignalWireError": "receiver.signalwire",
    "Sink": "receiver.sinks.base",
    "SinkError": "receiver.exceptions",
    "SinkFactory": "receiver.sinks.base",
    "StreamEnd": "receiver.sinks.base",
    "StreamInfo": "receiver.sinks.base",
    "StreamRequestInvalid": "receiver.signalwire",
    "StreamSummary": "receiver.sinks.base",
    "Track": "receiver.events",
    "TrackStats": "receiver.session",
    "UnexpectedMessage": "receiver.exceptions",
    "UnsupportedMedia": "receiver.exceptions",
    "WavSink": "receiver.sinks.wav",
    "load_settings": "receiver.settings",
}

__all__ = [
    "ApiError",
    "ApiUnreachable",
    "AudioBatch",
    "ConferenceStream",
    "ConferenceStreamsClient",
    "ConfigError",
    "ConnectFailed",
    "DtmfRecord",
    "LimitExceeded",
    "LiveAudio",
    "LiveStream",
    "MalformedMessage",
    "MarkRecord",
    "MemorySink",
    "ProtocolError",
    "Receiver",
    "ReceiverError",
    "RecordingFailed",
    "Settings",
    "SignalWireError",
    "Sink",
    "SinkError",
    "SinkFactory",
    "StreamEnd",
    "StreamInfo",
    "StreamRequestInvalid",
    "StreamSummary",
    "Track",
    "TrackStats",
    "UnexpectedMessage",
    "UnsupportedMedia",
    "WavSink",
    "__version__",
    "load_settings",
]

if TYPE_CHECKING:
    from receiver.events import Track
    from receiver.exceptions import (
        ConfigError,
        ConnectFailed,
        LimitExceeded,
        MalformedMessage,
        ProtocolError,
        ReceiverError,
        RecordingFailed,
        SinkError,
        UnexpectedMessage,
        UnsupportedMedia,
    )
    from receiver.live import LiveAudio, LiveStream
    from receiver.server import Receiver
    from receiver.session import AudioBatch, DtmfRecord, MarkRecord, TrackStats
    from receiver.settings import Settings, load_settings
    from receiver.signalwire import (
        ApiError,
        ApiUnreachable,
        ConferenceStream,
        ConferenceStreamsClient,
        SignalWireError,
        StreamRequestInvalid,
    )
    from receiver.sinks.base import Sink, SinkFactory, StreamEnd, StreamInfo, StreamSummary
    from receiver.sinks.memory import MemorySink
    from receiver.sinks.wav import WavSink


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'receiver' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
