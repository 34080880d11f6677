# The C twins of frames._split_python and protocol._python_fast_media (receiver/_speedups.c).
from receiver.events import Media

def split_frames(
    buffer: bytes | bytearray, max_size: int, messages: list[str], control: list[bytes], /
) -> tuple[int, bool]: ...
def media(text: str, cls: type[Media], /) -> Media | None: ...
