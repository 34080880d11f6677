# The C twins of frames._split_python, protocol._python_fast_media, codecs._take_python and
# session._steady_python, and place_run, both of the last two in one call a run of frames
# (receiver/_speedups.c).
from collections.abc import Sequence
from typing import Any

from receiver.events import Media, Track

def split_frames(
    buffer: bytes | bytearray, max_size: int, messages: list[str], control: list[bytes], /
) -> tuple[int, bool]: ...
def media(text: str, cls: type[Media], /) -> Media | None: ...
def lookup16(data: bytes | bytearray | memoryview, table: object, /) -> bytearray: ...
def steady(clock: Any, frame: Media, rate: int, max_samples: int, /) -> bool: ...
def place_run(
    messages: Sequence[str | bytes],
    start: int,
    tracks: dict[Track, Any],
    rate: int,
    max_samples: int,
    batch_samples: int,
    /,
) -> tuple[int, Track | None]: ...
