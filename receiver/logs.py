"""Logging set-up: human-readable lines by default, JSON lines by setting.

Lines about a stream carry its sid as the record attribute ``stream_sid`` (set by
``StreamLogger``): the text format shows it as ``[sid]``, the JSON format as a field. Tokens
and payloads are never logged; client text is escaped and cut short before it gets here.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]


class StreamLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds ``stream_sid`` to every record about one stream."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


class TextFormatter(logging.Formatter):
    """``time level logger: [stream_sid] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        sid = getattr(record, "stream_sid", None)
        if sid is not None:
            record.message = f"[{sid}] {record.message}"
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, stream_sid, exception, and the
    record's ``fields`` (``extra={"fields": {...}}``: figures a program should not parse out of
    the message)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        sid = getattr(record, "stream_sid", None)
        if sid is not None:
            entry["stream_sid"] = sid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update((k, v) for k, v in fields.items() if k not in entry)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


class QuietInfo(logging.LoggerAdapter[logging.Logger]):
    """websockets' logger with its INFO lines ("connection open", "HTTP response sent",
    "connection closed": two a /healthz probe, none with the peer) lowered to DEBUG; we log
    what matters about each connection ourselves."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)


def setup_logging(*, level: str, log_format: LogFormat) -> None:
    """Send every log line to stderr in ``log_format`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
