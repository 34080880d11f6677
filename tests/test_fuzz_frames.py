"""Fuzzing the frame splitter against websockets' own parser: any stream of frames, cut
anywhere, gives the same messages, the same control frames, the same answers and the same
end."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from receiver.frames import TextFrames
from tests.support.fuzzing import fuzz
from tests.support.strategies import OP_CLOSE, OP_TEXT, SPLIT_MAX_SIZE, client_frame


def websockets_view(protocol: Any, events: list[Any]) -> tuple[list[Any], list[Any], Any]:
    """Messages as recv() would return them (up to a text frame that is not UTF-8, where
    websockets fails the connection), control frames, and how the protocol ended."""
    messages: list[Any] = []
    control: list[tuple[int, bytes]] = []
    parts: list[Any] = []
    broken = False
    for frame in events:
        if frame.opcode.value >= OP_CLOSE:
            control.append((frame.opcode.value, bytes(frame.data)))
            continue
        parts.append(frame)
        if not frame.fin or broken:
            continue
        data = b"".join(bytes(f.data) for f in parts)
        if parts[0].opcode.value == OP_TEXT:
            try:
                messages.append(data.decode())
            except UnicodeDecodeError:
                messages.append("<invalid utf-8>")
                broken = True
        else:
            messages.append(data)
        parts = []
    ending = (
        protocol.state,
        type(protocol.parser_exc).__name__ if protocol.parser_exc else None,
        protocol.close_sent,
        protocol.close_rcvd,
        b"".join(protocol.data_to_send()),
    )
    return messages, control, ending


def make_websockets_parser() -> Any:
    from websockets.protocol import Protocol, Side, State

    return Protocol(Side.SERVER, state=State.OPEN, max_size=SPLIT_MAX_SIZE)


@given(st.lists(client_frame(), max_size=12), st.data())
@fuzz
def test_text_frames_split_as_websockets_parses(frames: list[bytes], data: st.DataObject) -> None:
    """TextFrames plus websockets for what it hands on equals websockets alone, for any frames
    cut into any reads: messages, pings and pongs, answers sent, close and errors."""
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    alone = make_websockets_parser()
    alone_events: list[Any] = []
    for chunk in reads:
        alone.receive_data(chunk)
        alone_events += alone.events_received()

    splitter: TextFrames | None = TextFrames(max_size=SPLIT_MAX_SIZE)
    behind = make_websockets_parser()
    fast: list[str] = []
    behind_events: list[Any] = []
    for chunk in reads:
        if splitter is None:
            behind.receive_data(chunk)
        else:
            split = splitter.feed(chunk)
            fast += split.messages
            for frame in split.control:
                behind.receive_data(frame)
            if split.handback is not None:
                splitter = None
                behind.receive_data(split.handback)
        behind_events += behind.events_received()

    messages, control, ending = websockets_view(behind, behind_events)
    assert (fast + messages, control, ending) == websockets_view(alone, alone_events)
