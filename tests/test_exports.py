"""The public API: ``receiver.__all__`` (httpx's tests/test_exported_members.py is the model)."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
import types
from pathlib import Path

import receiver

ROOT = Path(__file__).parent.parent
# What the issue names as public: the server, its settings, the sink contract and its
# records, the sinks people pass in, live audio, the SignalWire client, the errors.
PUBLIC = {
    "Receiver",
    "Settings",
    "load_settings",
    "Sink",
    "SinkFactory",
    "StreamInfo",
    "StreamSummary",
    "StreamEnd",
    "AudioBatch",
    "DtmfRecord",
    "MarkRecord",
    "TrackStats",
    "Track",
    "WavSink",
    "MemorySink",
    "LiveAudio",
    "LiveStream",
    "ConferenceStreamsClient",
    "ConferenceStream",
    "ReceiverError",
    "ConfigError",
    "ProtocolError",
    "MalformedMessage",
    "UnexpectedMessage",
    "UnsupportedMedia",
    "LimitExceeded",
    "SinkError",
    "RecordingFailed",
    "ConnectFailed",
    "SignalWireError",
    "StreamRequestInvalid",
    "ApiError",
    "ApiUnreachable",
    "__version__",
}


def test_all_is_printable_from_a_shell() -> None:
    """`python -c "import receiver; print(receiver.__all__)"` works, without importing the
    server (names are imported on first use)."""
    code = "import sys, receiver; print(receiver.__all__); print('receiver.server' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    listed, server_imported = result.stdout.splitlines()
    assert eval(listed) == receiver.__all__  # noqa: S307 - our own repr of a list of str
    assert server_imported == "False"


def test_exported_names_are_the_public_api() -> None:
    """__all__ is exactly the public API, each name once, and each one resolves."""
    assert len(set(receiver.__all__)) == len(receiver.__all__)
    assert set(receiver.__all__) == PUBLIC
    for name in receiver.__all__:
        value = getattr(receiver, name)
        assert not isinstance(value, types.ModuleType), name
    assert set(receiver.__all__) <= set(dir(receiver))


def test_every_exported_object_comes_from_the_package() -> None:
    """Each exported class or function is the one its module defines (no re-export of a
    third-party name), and `from receiver import *` gives exactly __all__."""
    for name in receiver.__all__:
        value = getattr(receiver, name)
        module = getattr(value, "__module__", None)
        if isinstance(value, type | types.FunctionType):
            assert str(module).startswith("receiver."), (name, module)
    namespace: dict[str, object] = {}
    exec("from receiver import *", namespace)  # noqa: S102 - the statement under test
    assert set(namespace) - {"__builtins__"} == set(receiver.__all__)


def test_module_all_lists_name_what_the_module_has() -> None:
    """Every module with an __all__ defines each name in it, and lists it sorted."""
    for info in pkgutil.walk_packages(receiver.__path__, "receiver."):
        if info.name.endswith(".__main__"):
            continue  # runs a command line
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        if names is None:
            continue
        for name in names:
            assert hasattr(module, name), f"{info.name}.{name}"


def test_docs_teach_only_the_public_api() -> None:
    """The README's Python and examples/vad.py import every exported name from `receiver`
    itself, never from the module that happens to define it."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    for text in [*blocks, (ROOT / "examples" / "vad.py").read_text()]:
        for match in re.finditer(r"^\s*from (receiver[\w.]*) import ([\w, ]+)", text, re.M):
            names = {name.strip() for name in match.group(2).split(",")}
            if match.group(1) == "receiver":
                assert names <= set(receiver.__all__), names
            else:
                assert not names & set(receiver.__all__), match.group(0)
