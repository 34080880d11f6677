"""receiver: a wss endpoint that records SignalWire (Twilio-compatible) media streams."""

from __future__ import annotations

__version__ = "0.1.0"
