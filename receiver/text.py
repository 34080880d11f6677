"""Text helpers shared by every layer (pure, no imports from the package).

``shorten`` is the one way client text reaches a log line, a close reason or an error message;
``parse_pairs`` the one parser of the command line's repeatable ``--param key=value``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["parse_pairs", "shorten"]


def shorten(text: str, max_bytes: int = 48) -> str:
    """``text`` made safe for one log line or a close reason: at most ``max_bytes`` of UTF-8.

    Characters that are not printable are escaped (``\\n``, ``\\x00``, ``\\u200b``, a lone
    surrogate ``\\ud800``), so a client can neither forge log lines nor make a close reason
    unsendable; printable text stays as it is (``é``). Longer text is cut on a character
    boundary and ends with ``...``. Pass ``ascii(value)`` to show a non-string. The work is
    bounded by ``max_bytes``, not by the length of ``text``.
    """
    head = text[: max_bytes + 1]
    whole = len(head) == len(text)
    if not head.isprintable():
        head = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in head)
    encoded = head.encode()
    if whole and len(encoded) <= max_bytes:
        return head
    return encoded[: max(max_bytes - 3, 0)].decode(errors="ignore") + "..."


def parse_pairs(pairs: Iterable[str]) -> list[tuple[str, str]]:
    """``key=value`` strings as ``(key, value)`` pairs, in order; ValueError names a bad one.

    The value may itself hold ``=`` (only the first one splits); the key may not be empty.
    """
    parsed: list[tuple[str, str]] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"takes key=value, got {shorten(pair)!r}")
        parsed.append((key, value))
    return parsed
