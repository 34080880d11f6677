"""Every error the receiver raises on purpose.

::

    ReceiverError
     ├── ConfigError            an invalid setting; names the variable
     ├── ProtocolError          a client broke the stream protocol; carries the close code
     │    ├── MalformedMessage      1007: not JSON, wrong types, bad base64, bad length
     │    ├── UnexpectedMessage     1008: out of order (media before start, a second start)
     │    ├── UnsupportedMedia      1003: binary frames, an encoding we cannot decode
     │    └── LimitExceeded         1008: a size, count or time limit
     ├── SinkError              a sink failed; names the sink
     ├── ListenError            a port could not be bound; names which one (streams or metrics)
     ├── RecordingFailed        every sink of a stream failed: the stream is closed with 1011
     ├── ConnectFailed          the simulator reached no receiver, or was refused; names the URL
     └── SignalWireError        (receiver.signalwire) the Conference Streams API client
          ├── StreamRequestInvalid  a request caught before it is sent; names the field
          ├── ApiError              the API answered an error status, in its own words
          └── ApiUnreachable        no answer: refused, TLS, a timeout

A ``ProtocolError`` ends one stream, never the server: the server closes that connection with
``close_code`` and ``reason`` and keeps every sample received before.
"""

from __future__ import annotations

from receiver.text import shorten

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_INVALID_PAYLOAD",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_UNSUPPORTED_DATA",
    "MAX_CLOSE_REASON_BYTES",
    "ConfigError",
    "ConnectFailed",
    "LimitExceeded",
    "MalformedMessage",
    "ProtocolError",
    "ReceiverError",
    "RecordingFailed",
    "SinkError",
    "UnexpectedMessage",
    "UnsupportedMedia",
]

# RFC 6455 section 7.4.1 close codes used by the receiver.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011

# A close reason must fit a control frame: 125 bytes, 2 of which hold the code.
MAX_CLOSE_REASON_BYTES = 123


class ReceiverError(Exception):
    """Base class of the receiver's own errors."""


class ConfigError(ReceiverError):
    """A setting is invalid; the message names the variable and what is wrong."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(variable, problem)
        self.variable = variable
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.variable}: {self.problem}"


class ProtocolError(ReceiverError):
    """A message broke the stream protocol; the stream ends with ``close_code``."""

    close_code: int = CLOSE_POLICY_VIOLATION
    kind: str = "protocol"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason

    @property
    def close_reason(self) -> str:
        """The reason as printable ASCII cut to what a WebSocket close frame can carry."""
        return shorten(self.reason, MAX_CLOSE_REASON_BYTES)


class MalformedMessage(ProtocolError):
    """Not JSON, a field of the wrong type, bad base64, a payload of impossible length."""

    close_code = CLOSE_INVALID_PAYLOAD
    kind = "malformed"


class UnexpectedMessage(ProtocolError):
    """A message out of order: media before ``start``, a second ``start``."""

    close_code = CLOSE_POLICY_VIOLATION
    kind = "unexpected"


class UnsupportedMedia(ProtocolError):
    """Binary frames, or a media encoding the receiver cannot decode."""

    close_code = CLOSE_UNSUPPORTED_DATA
    kind = "unsupported"


class LimitExceeded(ProtocolError):
    """A configured limit was reached (sizes, counts, durations)."""

    close_code = CLOSE_POLICY_VIOLATION
    kind = "limit"


class SinkError(ReceiverError):
    """A sink failed; the other sinks and the server carry on."""

    def __init__(self, sink: str, cause: BaseException) -> None:
        super().__init__(sink, cause)
        self.sink = sink
        self.cause = cause

    def __str__(self) -> str:
        return f"sink {self.sink!r} failed: {type(self.cause).__name__}: {self.cause}"


class RecordingFailed(ReceiverError):
    """Every sink of a stream failed, so nothing would be kept: the stream ends with 1011."""

    close_code = CLOSE_INTERNAL_ERROR

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors)
        self.errors = errors

    def __str__(self) -> str:
        return "recording failed: " + "; ".join(self.errors)


class ListenError(ReceiverError):
    """A listening socket could not be bound: ``role`` says which (``streams``, ``metrics``)."""

    def __init__(self, *, role: str, host: str, port: int, problem: str) -> None:
        super().__init__(role, host, port, problem)
        self.role = role
        self.host = host
        self.port = port
        self.problem = problem

    def __str__(self) -> str:
        return f"cannot listen on {self.host}:{self.port} for {self.role}: {self.problem}"


class ConnectFailed(ReceiverError):
    """No WebSocket to ``url``: nothing listening, TLS refused, or the handshake refused."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(url, problem)
        self.url = url
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.url}: {self.problem}"
