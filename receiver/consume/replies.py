"""The shapes of Redis replies, RESP2 or RESP3, as plain Python values."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from receiver.sinks.redis.wire import text

__all__ = ["Entry", "Fields", "stream_items", "text"]

Fields = dict[bytes, bytes]
Entry = tuple[str, Fields]


def stream_items(response: Any) -> Iterator[tuple[str, list[Entry]]]:
    """``(key, [(id, fields)...])`` from an XREAD/XREADGROUP reply, RESP2 list or RESP3 dict."""
    if not response:
        return
    pairs = response.items() if isinstance(response, dict) else response
    for key, entries in pairs:
        if (
            entries
            and isinstance(entries[0], list)
            and entries[0]
            and isinstance(entries[0][0], (list, tuple))
        ):
            entries = entries[0]  # RESP3 wraps each key's entries once more
        yield text(key), [(text(i), f) for i, f in entries if f is not None]
