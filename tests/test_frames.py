"""The frame splitter on its own: reads cut anywhere, down to a byte at a time."""

from __future__ import annotations

from websockets.frames import Close, Opcode

from receiver.frames import TextFrames
from tests.support.wire import ws_frame


def test_frames_fed_a_byte_at_a_time_come_out_whole() -> None:
    """Text frames of every length form (7-bit, 16-bit, 64-bit), fed one byte per read, come
    out as the same messages, and nothing is left over."""
    texts = ["{}", "é" * 100, "x" * 30_000, "y" * 70_000]
    stream = b"".join(ws_frame(opcode=Opcode.TEXT, payload=t.encode()) for t in texts)
    splitter = TextFrames(max_size=1 << 20)
    messages: list[str] = []
    for i in range(len(stream)):
        split = splitter.feed(stream[i : i + 1])
        assert split.handback is None and not split.control
        messages += split.messages
    assert messages == texts
    assert splitter.buffered == b""


def test_hand_back_starts_at_the_first_frame_not_ours() -> None:
    """Messages before a binary frame are split and a ping before it is passed on whole; from
    the binary frame's first byte on, all that came is handed back, even mid-frame."""
    ping = ws_frame(opcode=Opcode.PING, payload=b"hi")
    rest = ws_frame(opcode=Opcode.BINARY, payload=b"\x00\x01") + ws_frame(
        opcode=Opcode.TEXT, payload=b"later"
    )
    close = ws_frame(opcode=Opcode.CLOSE, payload=Close(1000, "").serialize())
    first = ws_frame(opcode=Opcode.TEXT, payload=b"one")
    stream = first + ping + rest + close
    split = TextFrames(max_size=1024).feed(stream)
    assert split.messages == ["one"] and split.control == [ping]
    assert split.handback == rest + close
    cut = len(first) + len(ping) + 3  # inside the binary frame's header
    splitter = TextFrames(max_size=1024)
    assert splitter.feed(stream[: len(first) - 1]).messages == []
    split = splitter.feed(stream[len(first) - 1 : cut])
    assert split.messages == ["one"] and split.control == [ping]
    assert split.handback == stream[len(first) + len(ping) : cut]
