"""G.711 and L16 codecs: bit-exact with ITU-T G.711 as audioop and sox implement it."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from receiver import codecs
from receiver.codecs import CLI_CODECS, codec_for
from receiver.events import MediaFormat
from receiver.exceptions import MalformedMessage, UnsupportedMedia
from tests.support.audio import run, sox_decode, sox_encode

ALL_CODES = bytes(range(256))
ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int16)


@pytest.fixture(scope="module")
def audioop() -> ModuleType:
    """Python's own G.711 (deprecated in 3.11, gone in 3.13): an independent reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip("audioop")


def test_mulaw_decoding_matches_audioop_on_all_codes(audioop: Any) -> None:
    """All 256 μ-law codes decode as audioop.ulaw2lin does."""
    expected = np.frombuffer(audioop.ulaw2lin(ALL_CODES, 2), dtype="<i2")
    np.testing.assert_array_equal(codecs.decode_mulaw(ALL_CODES), expected)


def test_alaw_decoding_matches_audioop_on_all_codes(audioop: Any) -> None:
    """All 256 A-law codes decode as audioop.alaw2lin does."""
    expected = np.frombuffer(audioop.alaw2lin(ALL_CODES, 2), dtype="<i2")
    np.testing.assert_array_equal(codecs.decode_alaw(ALL_CODES), expected)


@pytest.mark.parametrize("kind", ["ul", "al"])
def test_decoding_matches_sox_on_all_codes(tmp_path: Path, kind: str) -> None:
    """All 256 codes of each law decode as sox decodes them."""
    raw = tmp_path / f"codes.{kind}"
    raw.write_bytes(ALL_CODES)
    ours = codecs.decode_mulaw(ALL_CODES) if kind == "ul" else codecs.decode_alaw(ALL_CODES)
    np.testing.assert_array_equal(ours, sox_decode(raw, kind))


def test_known_g711_values() -> None:
    """Anchor values from G.711: μ-law 0x00/0xFF/0x7F, A-law 0xD5/0x55/0x2A."""
    assert codecs.decode_mulaw(b"\x00\xff\x7f\x80").tolist() == [-32124, 0, 0, 32124]
    assert codecs.decode_alaw(b"\xd5\x55\x2a\xaa").tolist() == [8, -8, -32256, 32256]


def test_encoders_match_audioop_on_every_sample(audioop: Any) -> None:
    """Both encoders agree with audioop for all 65536 int16 values."""
    data = ALL_SAMPLES.astype("<i2").tobytes()
    assert codecs.encode_mulaw(ALL_SAMPLES) == audioop.lin2ulaw(data, 2)
    assert codecs.encode_alaw(ALL_SAMPLES) == audioop.lin2alaw(data, 2)


@pytest.mark.parametrize("kind", ["ul", "al"])
def test_sox_encoded_speech_decodes_as_sox_decodes_it(
    speech: Any, tmp_path: Path, kind: str
) -> None:
    """Real speech encoded by sox decodes to exactly the samples sox decodes it to."""
    theirs = sox_encode(speech["inbound"].wav[8000], kind, tmp_path / f"speech.{kind}")
    decode = codecs.decode_mulaw if kind == "ul" else codecs.decode_alaw
    np.testing.assert_array_equal(decode(theirs), sox_decode(tmp_path / f"speech.{kind}", kind))


@pytest.mark.parametrize("kind", ["ul", "al"])
def test_encoders_differ_from_sox_only_in_rounding(speech: Any, tmp_path: Path, kind: str) -> None:
    """On speech, our (audioop's) encoder and sox's pick the same or adjacent G.711 levels.

    G.711 encodes 14/13-bit input; from 16 bits audioop truncates and sox rounds, so where the
    discarded bits are near a half the two pick neighbouring levels (about 10% of speech).
    """
    theirs = sox_encode(speech["inbound"].wav[8000], kind, tmp_path / "s")
    samples = speech["inbound"].samples(8000)
    encode = codecs.encode_mulaw if kind == "ul" else codecs.encode_alaw
    decode = codecs.decode_mulaw if kind == "ul" else codecs.decode_alaw
    levels = np.unique(decode(ALL_CODES))
    ours_level = np.searchsorted(levels, decode(encode(samples)))
    theirs_level = np.searchsorted(levels, decode(theirs))
    assert np.abs(ours_level - theirs_level).max() == 1


def test_decode_then_encode_returns_the_codes() -> None:
    """G.711 codes survive decode+encode, but for μ-law's negative zero 0x7F (-> 0xFF)."""
    mu = bytearray(ALL_CODES)
    mu[0x7F] = 0xFF
    assert codecs.encode_mulaw(codecs.decode_mulaw(ALL_CODES)) == bytes(mu)
    assert codecs.encode_alaw(codecs.decode_alaw(ALL_CODES)) == ALL_CODES


@pytest.mark.parametrize(("order", "flag"), [("little", "-L"), ("big", "-B")])
@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_l16_matches_sox_in_both_byte_orders(
    speech: Any, tmp_path: Path, order: codecs.ByteOrder, flag: str, rate: int
) -> None:
    """L16 in either byte order decodes sox's raw output to the WAV's samples, and back."""
    raw = tmp_path / "speech.raw"
    run("sox", speech["inbound"].wav[rate], "-t", "s16", "-e", "signed-integer", flag, raw)
    samples = speech["inbound"].samples(rate)
    codec = codec_for(MediaFormat("audio/x-L16", rate), l16_byte_order=order)
    np.testing.assert_array_equal(codec.decode(raw.read_bytes()), samples)
    assert codec.encode(samples) == raw.read_bytes()


def test_odd_l16_length_is_malformed() -> None:
    """L16 payloads must be whole 16-bit samples."""
    with pytest.raises(MalformedMessage, match="161 bytes"):
        codecs.decode_l16(b"\x00" * 161, byte_order="little")


@pytest.mark.parametrize(
    ("encoding", "rate", "name"),
    [
        ("audio/x-mulaw", 8000, "pcmu"),
        ("AUDIO/X-MULAW", 8000, "pcmu"),
        (" audio/PCMU ", 8000, "pcmu"),
        ("audio/x-alaw", 8000, "pcma"),
        ("audio/pcma", 8000, "pcma"),
        ("audio/x-L16", 24000, "l16"),
        ("audio/l16;rate=16000", 16000, "l16"),
    ],
)
def test_codec_for_accepts_the_platform_spellings(encoding: str, rate: int, name: str) -> None:
    """Encodings match case-insensitively, with or without parameters."""
    codec = codec_for(MediaFormat(encoding, rate))
    assert (codec.name, codec.sample_rate_hz) == (name, rate)


@pytest.mark.parametrize(
    ("fmt", "named"),
    [
        (MediaFormat("audio/G722", 16000), "G722"),
        (MediaFormat("audio/opus", 48000), "opus"),
        (MediaFormat("audio/x-mulaw", 16000), "16000"),
        (MediaFormat("audio/x-L16", 11025), "11025"),
        (MediaFormat("audio/x-L16", 16000, channels=2), "2 channels"),
        (MediaFormat("", 8000), "''"),
        (MediaFormat("é" * 10_000, 8000), "é"),
    ],
)
def test_codec_for_names_what_it_cannot_decode(fmt: MediaFormat, named: str) -> None:
    """Unsupported formats raise UnsupportedMedia whose short reason names them."""
    with pytest.raises(UnsupportedMedia) as info:
        codec_for(fmt)
    assert named in info.value.reason
    assert len(info.value.close_reason.encode()) <= 123
    assert info.value.close_code == 1003


def test_cli_codecs_round_trip() -> None:
    """Every simulator codec encodes and decodes a ramp losslessly up to G.711 quantisation."""
    ramp = np.arange(-30000, 30000, 7, dtype=np.int16)
    for name, fmt in CLI_CODECS.items():
        codec = codec_for(fmt)
        decoded = codec.decode(codec.encode(ramp))
        if codec.name == "l16":
            np.testing.assert_array_equal(decoded, ramp)
        else:
            assert np.abs(decoded.astype(int) - ramp).max() < 1100, name
            np.testing.assert_array_equal(codec.decode(codec.encode(decoded)), decoded)
