"""Sans-I/O splitter of a client's WebSocket byte stream into text messages, for the hot path.

websockets parses each frame with a generator (more Python a media frame than the receiver's
own work on it) and hands it on through a queue; this splitter costs a fraction of that
(``python -m bench.core`` prints both and their ratio), and its loop runs in C
(``receiver._speedups.split_frames``, ~15x its Python twin ``_split_python``, which stays the
reference the tests hold it to). So once a connection is open,
``receiver.connection`` feeds its bytes here and websockets sees only what this module does
not handle itself:

- a final, masked, unextended text frame up to ``max_size`` whose payload is valid UTF-8 —
  every frame the platform sends — becomes a message (``str``);
- a ping or pong is passed on whole, for websockets to answer or acknowledge;
- at the first frame of any other kind (close, binary, fragmented, unmasked, reserved bits,
  too big, invalid UTF-8) the stream is handed back from that frame on, for good, and
  websockets parses, validates and closes as it always does.

Frames are only ever handed over whole, so websockets' parser always stands at a frame
boundary. The tests hold this splitter to websockets' own parser on random streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

_TEXT_FINAL = 0x81  # FIN, no reserved bits, opcode 1
_CONTROL_PASSED_ON = (0x89, 0x8A)  # final ping, final pong
_MASKED = 0x80
_MAX_CONTROL_PAYLOAD = 125


@dataclass(slots=True)
class Split:
    """What one ``feed`` found, in stream order within each list.

    ``handback`` is None while the splitter keeps the stream; otherwise it holds the bytes, from
    the first frame it does not handle, that websockets parses from now on (possibly empty).
    """

    messages: list[str] = field(default_factory=list)
    control: list[bytes] = field(default_factory=list)
    handback: bytes | None = None


class TextFrames:
    """Split the bytes a client sends into text messages, until a frame needs websockets.

    Holds at most one incomplete frame (up to ``max_size`` plus its header) between feeds, in a
    bytearray that grows in place: a frame sent a byte at a time costs linear time, not
    quadratic. Reads that end on a frame boundary, the usual case, copy nothing.
    """

    __slots__ = ("_buffer", "max_size")

    def __init__(self, *, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()

    @property
    def buffered(self) -> bytes:
        """The start of an incomplete frame (for handing back at the end of the stream)."""
        return bytes(self._buffer)

    def feed(self, data: bytes) -> Split:
        """Take the next bytes; return the complete frames they finish."""
        buffer: bytes | bytearray = data
        if self._buffer:
            self._buffer += data
            buffer = self._buffer
        split = Split()
        position, foreign = split_frames(buffer, self.max_size, split.messages, split.control)
        if foreign:
            return self._hand_back(split, buffer, position)
        if buffer is self._buffer:
            del self._buffer[:position]
        elif position < len(buffer):
            self._buffer = bytearray(buffer[position:])
        return split

    def _hand_back(self, split: Split, buffer: bytes | bytearray, position: int) -> Split:
        split.handback = bytes(buffer[position:])
        self._buffer = bytearray()
        return split


def _split_python(
    buffer: bytes | bytearray, max_size: int, messages: list[str], control: list[bytes]
) -> tuple[int, bool]:
    """Split whole frames off the start of ``buffer`` into ``messages`` and ``control``.

    Returns where it stopped and whether a frame it does not handle stopped it (True) or an
    incomplete one (False). The reference for ``receiver._speedups.split_frames``, its C twin
    (tests/test_speedups.py holds the two to the same results)."""
    end = len(buffer)
    position = 0
    while True:
        if end - position < 2:
            return position, False  # wait for the rest of the frame
        head, second = buffer[position], buffer[position + 1]
        if second < _MASKED:  # clients must mask: websockets refuses the frame
            return position, True
        size = second & 0x7F
        start = position + 6
        if size == 126:
            if end - position < 4:
                return position, False
            size = int.from_bytes(buffer[position + 2 : position + 4], "big")
            start = position + 8
        elif size == 127:
            if end - position < 10:
                return position, False
            size = int.from_bytes(buffer[position + 2 : position + 10], "big")
            start = position + 14
        stop = start + size
        if head == _TEXT_FINAL and size <= max_size:
            if stop > end:
                return position, False
            try:
                text = apply_mask(buffer[start:stop], buffer[start - 4 : start]).decode()
            except UnicodeDecodeError:  # websockets closes with 1007
                return position, True
            messages.append(text)
        elif head in _CONTROL_PASSED_ON and size <= _MAX_CONTROL_PAYLOAD:
            if stop > end:
                return position, False
            control.append(bytes(buffer[position:stop]))
        else:  # too big (websockets closes with 1009 before it arrives), or not ours
            return position, True
        position = stop


try:
    from receiver._speedups import split_frames
except ImportError:  # built without a compiler: the Python twin, ~4x slower (bench.core)
    split_frames = _split_python
