"""The redis sink's wire format, both ways (pure: no Redis), and `consume`'s refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from receiver.sinks.redis.wire import (
    FORMAT_VERSION,
    STREAM_ID,
    WireError,
    audio_fields,
    control_fields,
    make_stream_id,
    read_audio,
    read_control,
    to_json,
)
from tests.support.commands import run_receiver


def as_redis(fields: dict[object, object]) -> dict[bytes, bytes]:
    """Fields as Redis hands them back: bytes keys and values, numbers in decimal ASCII."""

    def raw(value: object) -> bytes:
        return value if isinstance(value, bytes) else str(value).encode()

    return {raw(k): raw(v) for k, v in fields.items()}


def test_a_control_entry_reads_back_as_written() -> None:
    """The fields the sink writes decode to the same kind, id, rate and data."""
    sid = "MZ../x \\u2603"
    stream_id = make_stream_id(sid)
    assert STREAM_ID.fullmatch(stream_id)
    body = to_json({"stream_sid": sid, "digit": "7"})
    entry = read_control(
        as_redis(control_fields("dtmf", stream_id=stream_id, rate_hz=16000, body=body))
    )
    assert (entry.kind, entry.stream_id, entry.rate_hz) == ("dtmf", stream_id, 16000)
    assert entry.data == {"stream_sid": sid, "digit": "7"}


def test_an_audio_entry_reads_back_sample_exact() -> None:
    """int16 samples go out little-endian and come back equal, at their position."""
    samples = (np.arange(-800, 800) * 40).astype(np.int16)
    entry = read_audio(
        as_redis(audio_fields(position=4800, rate_hz=8000, samples=samples)), default_rate_hz=1
    )
    assert entry.position == 4800 and entry.rate_hz == 8000
    np.testing.assert_array_equal(entry.samples, samples)


@pytest.mark.parametrize(
    "change, message",
    [
        ({b"v": str(FORMAT_VERSION + 1).encode()}, "format version"),
        ({b"type": b"explode"}, "unknown entry type"),
        ({b"data": b"[1, 2]"}, "not a JSON object"),
        ({b"data": b"{oops"}, "unreadable"),
    ],
)
def test_another_version_or_a_malformed_control_entry_is_refused(
    change: dict[bytes, bytes], message: str
) -> None:
    """A reader refuses what it cannot be sure to understand, rather than guess."""
    fields = as_redis(control_fields("mark", stream_id="a.0123abcd", rate_hz=8000, body="{}"))
    with pytest.raises(WireError, match=message):
        read_control({**fields, **change})


def test_a_malformed_audio_entry_is_refused() -> None:
    with pytest.raises(WireError, match="negative"):
        read_audio({b"position": b"-1", b"samples": b""}, default_rate_hz=8000)
    with pytest.raises(WireError, match="odd"):
        read_audio({b"position": b"0", b"samples": b"abc"}, default_rate_hz=8000)


@pytest.mark.parametrize("url", ["http://localhost:6379/0", "https://redis.example/0", "localhost"])
def test_consume_with_a_url_that_is_not_redis_is_one_line_and_exit_2(
    url: str, tmp_path: Path
) -> None:
    """docs/redis.md promises exit 2 for bad usage; the URL (it may hold a password) is not
    echoed."""
    done = run_receiver("consume", "--url", url, "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--url" in lines[0] and "redis://" in lines[0], done.stderr
    assert url not in done.stderr
