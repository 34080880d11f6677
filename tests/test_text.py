"""receiver.text: the one shortener of client text and the one ``key=value`` parser."""

from __future__ import annotations

import pytest

from receiver.text import parse_pairs, shorten


@pytest.mark.parametrize(
    ("text", "limit", "shown"),
    [
        ("abc", 48, "abc"),
        ("a" * 60, 10, "aaaaaaa..."),
        ("line\nforged", 48, "line\\nforged"),
        ("x\ud800", 48, "x\\ud800"),
        ("é" * 5, 48, "ééééé"),
        ("\x00" * 1000, 12, "\\x00\\x00\\..."),
    ],
)
def test_shorten_escapes_and_bounds(text: str, limit: int, shown: str) -> None:
    """Non-printable characters are escaped, printable ones kept, the result fits the limit
    in UTF-8 bytes and is always encodable."""
    result = shorten(text, limit)
    assert result == shown
    assert len(result.encode()) <= limit


def test_shorten_cuts_on_a_character_boundary() -> None:
    """A cut never splits a UTF-8 sequence (a close reason must be valid UTF-8)."""
    for limit in range(3, 40):
        result = shorten("é" * 100, limit)
        assert len(result.encode()) <= limit and result.endswith("...")


def test_parse_pairs() -> None:
    """key=value pairs in order; the value may hold '='; a pair without key or '=' is refused."""
    assert parse_pairs(["a=1", "b=x=y", "c="]) == [("a", "1"), ("b", "x=y"), ("c", "")]
    for bad in ("novalue", "=v"):
        with pytest.raises(ValueError, match="key=value"):
            parse_pairs([bad])
