"""Fuzzing the codecs: any start.mediaFormat gives a codec or UnsupportedMedia, and every codec
decodes any bytes exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.codecs import (
    codec_for,
    decode_alaw,
    decode_l16,
    decode_mulaw,
    encode_alaw,
    encode_l16,
    encode_mulaw,
)
from receiver.events import (
    MediaFormat,
)
from receiver.exceptions import (
    MalformedMessage,
    UnsupportedMedia,
)
from tests.support.fuzzing import check_error, fuzz
from tests.support.strategies import encodings

# ---------------------------------------------------------------------------------------------
# Codecs: start.mediaFormat to a codec, and the codecs themselves.


@given(
    encodings(),
    st.sampled_from([8000, 16000, 24000, 44100, 48000, 32000, 1, 0, 7999, 10**15 - 1])
    | st.integers(0, 10**15),
    st.sampled_from([1, 1, 1, 0, 2]) | st.integers(0, 10**15),
    st.sampled_from(["little", "big"]),
)
@fuzz
def test_any_media_format_gives_a_codec_or_unsupported_media(
    encoding: str, rate: int, channels: int, order: Any
) -> None:
    """Every mediaFormat is a working mono codec or a 1003 naming what it cannot decode."""
    try:
        codec = codec_for(MediaFormat(encoding, rate, channels), l16_byte_order=order)
    except UnsupportedMedia as exc:
        check_error(exc)
        return
    assert channels == 1
    assert codec.sample_rate_hz == rate
    kind = encoding.split(";", 1)[0].strip().lower()
    assert codec.name == {"audio/x-l16": "l16", "audio/l16": "l16"}.get(
        kind, "pcma" if "alaw" in kind or "pcma" in kind else "pcmu"
    )
    assert codec.bytes_per_sample == (2 if codec.name == "l16" else 1)
    if codec.name != "l16":
        assert rate == 8000
    samples = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    assert len(codec.decode(codec.encode(samples))) == len(samples)


# Regression (found by the fuzzing, fixed in d4d163f by truncate_utf8): the G.711 wrong-rate
# reason carries the client's encoding unescaped; with a lone surrogate in it (a \ud800 JSON
# escape, which the stdlib json parser passed through) the close reason could not be sent.
def test_unsupported_media_reason_is_always_utf8() -> None:
    """The close reason of an unsupported format is sendable even with a lone surrogate in it."""
    with pytest.raises(UnsupportedMedia) as info:
        codec_for(MediaFormat("audio/x-mulaw;\ud800", 16000))
    check_error(info.value)


@given(st.binary(max_size=512), st.sampled_from(["little", "big"]))
@fuzz
def test_codecs_decode_any_bytes_exactly(data: bytes, order: Any) -> None:
    """G.711 decodes every byte to one sample (a fixed point of encode); L16 is lossless or 1007."""
    for decode, encode in ((decode_mulaw, encode_mulaw), (decode_alaw, encode_alaw)):
        samples = decode(data)
        assert samples.dtype == np.int16 and len(samples) == len(data)
        np.testing.assert_array_equal(decode(encode(samples)), samples)
    if len(data) % 2:
        with pytest.raises(MalformedMessage):
            decode_l16(data, byte_order=order)
        return
    samples = decode_l16(data, byte_order=order)
    assert samples.dtype == np.int16 and len(samples) == len(data) // 2
    assert encode_l16(samples, byte_order=order) == data
    other = "big" if order == "little" else "little"
    np.testing.assert_array_equal(decode_l16(data, byte_order=other), samples.byteswap())
