"""G.711 μ-law / A-law and L16 with numpy: pure functions, no I/O, no ``audioop``.

Decoders are 256-entry lookup tables, encoders 65536-entry ones, built once at import from the
ITU-T G.711 segment rules as the classic Sun ``g711.c`` states them (the same arithmetic as
Python 3.11's ``audioop``, sox and libsndfile, which the tests compare against bit for bit).
One table lookup per call (``receiver._speedups.lookup16``, else ``np.take``), so a batch of
frames is decoded at once (``python -m bench.core`` measures the per-frame cost of the whole
core).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from receiver.events import MediaFormat
from receiver.exceptions import MalformedMessage, UnsupportedMedia
from receiver.text import shorten

__all__ = [
    "CLI_CODECS",
    "ByteOrder",
    "Codec",
    "CodecName",
    "codec_for",
    "decode_alaw",
    "decode_l16",
    "decode_mulaw",
    "encode_alaw",
    "encode_l16",
    "encode_mulaw",
]

ByteOrder = Literal["little", "big"]
CodecName = Literal["pcmu", "pcma", "l16"]

_MULAW_NAMES = frozenset({"audio/x-mulaw", "audio/mulaw", "audio/pcmu", "audio/basic"})
_ALAW_NAMES = frozenset({"audio/x-alaw", "audio/alaw", "audio/pcma"})
_L16_NAMES = frozenset({"audio/x-l16", "audio/l16"})
_G711_RATES = frozenset({8000})
_L16_RATES = frozenset({8000, 16000, 24000, 32000, 44100, 48000})


def _mulaw_decode_table() -> NDArray[np.int16]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_decode_table() -> NDArray[np.int16]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _segment(magnitude: NDArray[np.int32], ends: tuple[int, ...]) -> NDArray[np.int32]:
    """Index of the first segment end >= magnitude (8 when beyond the last)."""
    return np.searchsorted(np.array(ends), magnitude, side="left").astype(np.int32)


def _mulaw_encode_table() -> NDArray[np.uint8]:
    # Indexed by the int16 sample viewed as uint16; G.711 μ-law works on the top 14 bits.
    pcm = np.arange(65536, dtype=np.int32).astype(np.uint16).view(np.int16).astype(np.int32) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), 8159) + 0x21
    seg = _segment(magnitude, (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF))
    code = (seg << 4) | ((magnitude >> (seg + 1)) & 0x0F)
    return (np.where(seg >= 8, 0x7F, code) ^ mask).astype(np.uint8)


def _alaw_encode_table() -> NDArray[np.uint8]:
    # A-law works on the top 13 bits.
    pcm = np.arange(65536, dtype=np.int32).astype(np.uint16).view(np.int16).astype(np.int32) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    magnitude = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = _segment(magnitude, (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF))
    quant = np.where(seg < 2, magnitude >> 1, magnitude >> np.maximum(seg, 1)) & 0x0F
    code = (seg << 4) | quant
    return (np.where(seg >= 8, 0x7F, code) ^ mask).astype(np.uint8)


_MULAW_DECODE = _mulaw_decode_table()
_ALAW_DECODE = _alaw_decode_table()
_MULAW_ENCODE = _mulaw_encode_table()
_ALAW_ENCODE = _alaw_encode_table()
for _table in (_MULAW_DECODE, _ALAW_DECODE, _MULAW_ENCODE, _ALAW_ENCODE):
    _table.flags.writeable = False


def _take_python(data: bytes, table: NDArray[np.int16]) -> NDArray[np.int16]:
    """Each byte of ``data`` indexed into ``table``: the reference for ``_speedups.lookup16``."""
    return table.take(np.frombuffer(data, dtype=np.uint8))


def _take_c(data: bytes, table: NDArray[np.int16]) -> NDArray[np.int16]:
    # Under half numpy's take for a 200 ms batch (python -m bench.core prints both).
    return np.frombuffer(lookup16(data, table), np.int16)  # dtype= by keyword costs 0.2 us


try:
    from receiver._speedups import lookup16
except ImportError:  # not built (no C compiler at install): numpy's take does it
    _take = _take_python
else:
    _take = _take_c


def decode_mulaw(data: bytes) -> NDArray[np.int16]:
    """G.711 μ-law bytes to 16-bit linear samples (a new, writable array)."""
    return _take(data, _MULAW_DECODE)


def decode_alaw(data: bytes) -> NDArray[np.int16]:
    """G.711 A-law bytes to 16-bit linear samples (a new, writable array)."""
    return _take(data, _ALAW_DECODE)


def decode_l16(data: bytes, *, byte_order: ByteOrder) -> NDArray[np.int16]:
    """16-bit linear PCM in ``byte_order`` to native int16 samples (a new, writable array).

    Raises ``MalformedMessage`` when ``data`` is not whole samples.
    """
    if len(data) % 2:
        raise MalformedMessage(f"L16 payload of {len(data)} bytes is not whole 16-bit samples")
    return np.frombuffer(data, dtype="<i2" if byte_order == "little" else ">i2").astype(np.int16)


def encode_mulaw(samples: NDArray[np.int16]) -> bytes:
    """16-bit linear samples to G.711 μ-law bytes (what ``audioop.lin2ulaw`` gives)."""
    return bytes(_MULAW_ENCODE.take(np.asarray(samples, dtype=np.int16).view(np.uint16)))


def encode_alaw(samples: NDArray[np.int16]) -> bytes:
    """16-bit linear samples to G.711 A-law bytes (what ``audioop.lin2alaw`` gives)."""
    return bytes(_ALAW_ENCODE.take(np.asarray(samples, dtype=np.int16).view(np.uint16)))


def encode_l16(samples: NDArray[np.int16], *, byte_order: ByteOrder) -> bytes:
    """16-bit samples to L16 bytes in ``byte_order``."""
    return np.asarray(samples, dtype="<i2" if byte_order == "little" else ">i2").tobytes()


@dataclass(frozen=True, slots=True)
class Codec:
    """How one media format's payload becomes int16 samples, and back (for the simulator)."""

    name: CodecName
    sample_rate_hz: int
    bytes_per_sample: int
    decode: Callable[[bytes], NDArray[np.int16]]
    encode: Callable[[NDArray[np.int16]], bytes]
    media_format: MediaFormat


CLI_CODECS: Mapping[str, MediaFormat] = {
    "pcmu": MediaFormat("audio/x-mulaw", 8000),
    "pcma": MediaFormat("audio/x-alaw", 8000),
    "l16-8k": MediaFormat("audio/x-L16", 8000),
    "l16-16k": MediaFormat("audio/x-L16", 16000),
    "l16-24k": MediaFormat("audio/x-L16", 24000),
}
"""The simulator's ``--codec`` names, as SignalWire spells their ``mediaFormat``."""


def codec_for(media_format: MediaFormat, *, l16_byte_order: ByteOrder = "little") -> Codec:
    """The codec of a ``start.mediaFormat``; ``UnsupportedMedia`` names what it cannot decode.

    Encodings match case-insensitively, ignoring ``;parameters`` (``audio/L16;rate=16000``).
    """
    sent = media_format.encoding
    encoding = sent.split(";", 1)[0].strip().lower()
    rate = media_format.sample_rate_hz
    if media_format.channels != 1:
        raise UnsupportedMedia(f"{media_format.channels} channels (receiver decodes mono)")
    if encoding in _MULAW_NAMES or encoding in _ALAW_NAMES:
        if rate not in _G711_RATES:
            raise UnsupportedMedia(f"G.711 {shorten(sent, 40)} at {rate} Hz (only 8000 Hz exists)")
        mulaw = encoding in _MULAW_NAMES
        return Codec(
            name="pcmu" if mulaw else "pcma",
            sample_rate_hz=rate,
            bytes_per_sample=1,
            decode=decode_mulaw if mulaw else decode_alaw,
            encode=encode_mulaw if mulaw else encode_alaw,
            media_format=MediaFormat("audio/x-mulaw" if mulaw else "audio/x-alaw", rate),
        )
    if encoding in _L16_NAMES:
        if rate not in _L16_RATES:
            raise UnsupportedMedia(f"L16 at {rate} Hz is not supported")
        order = l16_byte_order
        return Codec(
            name="l16",
            sample_rate_hz=rate,
            bytes_per_sample=2,
            decode=lambda data: decode_l16(data, byte_order=order),
            encode=lambda samples: encode_l16(samples, byte_order=order),
            media_format=MediaFormat("audio/x-L16", rate),
        )
    raise UnsupportedMedia(
        f"unsupported encoding '{shorten(sent, 40)}' "
        "(receiver decodes audio/x-mulaw, audio/x-alaw, audio/x-L16)"
    )
