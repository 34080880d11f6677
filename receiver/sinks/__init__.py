"""Sinks: where streams go. ``Fanout`` runs several per stream, each isolated from the others.

Sinks are found by name: the built-in ones below, then the ``receiver.sinks`` entry-point group,
whose objects are ``SinkFactory`` callables (``Settings -> Sink``), or classes whose instances
are (made once per call of ``load_sink_factories``: one per ``Receiver``, never a module global).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from receiver.events import Track
from receiver.exceptions import ConfigError, SinkError
from receiver.session import DtmfRecord, MarkRecord
from receiver.sinks.base import AsyncSink, Lifecycle, Sink, SinkFactory, StreamInfo, StreamSummary
from receiver.sinks.memory import MemorySink
from receiver.sinks.wav import WavSink

if TYPE_CHECKING:
    from receiver.settings import Settings

__all__ = [
    "AsyncSink",
    "Fanout",
    "Lifecycle",
    "MemorySink",
    "Sink",
    "SinkFactory",
    "StreamInfo",
    "StreamSummary",
    "WavSink",
    "load_sink_factories",
    "sink_factories_for",
]

ENTRY_POINT_GROUP = "receiver.sinks"
_BUILT_IN: dict[str, SinkFactory] = {"wav": WavSink.from_settings}


def load_sink_factories(names: Sequence[str]) -> list[tuple[str, SinkFactory]]:
    """Resolve sink names to factories; an unknown name is a ``ConfigError`` at start-up."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    factories: list[tuple[str, SinkFactory]] = []
    for name in names:
        if name in _BUILT_IN:
            factories.append((name, _BUILT_IN[name]))
        elif name in found:
            loaded = found[name].load()
            # A class stands for its instance: per-process state lives in that object.
            factories.append((name, loaded() if isinstance(loaded, type) else loaded))
        else:
            known = ", ".join(sorted(set(_BUILT_IN) | set(found)))
            raise ConfigError("RECEIVER_SINKS", f"unknown sink {name!r} (known: {known})")
    return factories


def sink_factories_for(settings: Settings) -> list[tuple[str, SinkFactory]]:
    """``RECEIVER_SINKS``' factories, plus delivery (uploads, webhooks) when it is configured."""
    factories = load_sink_factories(settings.sinks)
    if settings.upload_url is not None or settings.webhook_url is not None:
        from receiver.delivery import Delivery

        factories.append(("delivery", Delivery()))
    return factories


class Fanout:
    """Hands one stream to several sinks; a sink that raises is dropped, not the stream.

    A failed sink is logged once, counted through ``on_error`` and named in ``errors`` (which
    the summary carries into ``stream.json``). ``close`` still reaches it, so that whatever it
    had written gets finished.
    """

    def __init__(
        self,
        sinks: Sequence[tuple[str, Sink]],
        *,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        on_error: Callable[[str], None] = lambda name: None,
        on_write_seconds: Callable[[str], Callable[[float], None]] | None = None,
    ) -> None:
        self._sinks = list(sinks)
        # One timing callback per sink, looked up once (a labelled histogram child).
        self._timers = (
            {name: on_write_seconds(name) for name, _ in sinks} if on_write_seconds else {}
        )
        self._live = list(sinks)
        self._alive = self._records()
        self._logger = logger
        self._on_error = on_error
        self.errors: list[str] = []

    @property
    def alive(self) -> bool:
        """Whether any sink still records; when none does, the stream records nothing.

        Sinks that only watch (``observer = True``, like the web page's levels) do not count.
        """
        return self._alive  # asked after every batch: kept up to date by _fail

    def _records(self) -> bool:
        return any(not getattr(sink, "observer", False) for _, sink in self._live)

    @property
    def locations(self) -> list[str]:
        """Where sinks put the stream (a sink may say so in a ``location`` attribute)."""
        found = (getattr(sink, "location", None) for _, sink in self._sinks)
        return [str(where) for where in found if where]

    def open(self, info: StreamInfo) -> None:
        """Open every sink."""
        for name, sink in list(self._live):
            self._call(name, sink, "open", sink.open, info)

    def write(self, track: Track, position: int, samples: NDArray[np.int16]) -> None:
        """Write a batch to every sink still working."""
        for name, sink in self._live:
            started = time.perf_counter()
            try:
                sink.write(track, position, samples)
            except Exception as exc:  # noqa: BLE001 - isolate the sink, keep the stream
                self._fail(name, sink, "write", exc)
            timer = self._timers.get(name)
            if timer is not None:
                timer(time.perf_counter() - started)

    def event(self, record: DtmfRecord | MarkRecord) -> None:
        """Pass a DTMF digit or mark to every sink still working."""
        for name, sink in list(self._live):
            self._call(name, sink, "event", sink.event, record)

    @property
    def directory(self) -> Path | None:
        """Where the record sink (``writes_record``) put the stream's files, if it did."""
        for _, sink in self._sinks:
            found = getattr(sink, "directory", None) if getattr(sink, "writes_record", 0) else None
            if found is not None:
                return Path(found)
        return None

    async def aclose(self, summary_for: Callable[[tuple[str, ...]], StreamSummary]) -> None:
        """Close every sink, failed ones too; ``summary_for(errors)`` builds the summary. A sink
        with an ``aclose`` (it finishes off the event loop) is awaited, the others' ``close``
        called.

        In three groups (see ``receiver.sinks.base``): the others, then the sinks that keep the
        stream's record (``writes_record``: ``wav`` and its ``stream.json``), with a summary
        that includes what the others raised while closing, then those that deliver it.
        """
        for name, sink in self._ordered():
            summary = self._summary(summary_for)
            aclose = getattr(sink, "aclose", None)
            if aclose is None:
                self._call(name, sink, "close", sink.close, summary)
                continue
            try:
                await aclose(summary)
            except Exception as exc:  # noqa: BLE001 - isolate the sink, keep the stream
                self._fail(name, sink, "close", exc)

    def _ordered(self) -> list[tuple[str, Sink]]:
        def group(pair: tuple[str, Sink]) -> int:
            sink = pair[1]
            # getattr: sinks of entry points written before the attributes were in the protocol.
            if getattr(sink, "delivers_record", False):
                return 2
            return 1 if getattr(sink, "writes_record", False) else 0

        return sorted(self._sinks, key=group)

    def _summary(self, summary_for: Callable[[tuple[str, ...]], StreamSummary]) -> StreamSummary:
        return replace(summary_for(tuple(self.errors)), directory=self.directory)

    def _call(
        self, name: str, sink: Sink, step: str, method: Callable[[Any], None], arg: Any
    ) -> None:
        try:
            method(arg)
        except Exception as exc:  # noqa: BLE001 - isolate the sink, keep the stream
            self._fail(name, sink, step, exc)

    def _fail(self, name: str, sink: Sink, step: str, exc: Exception) -> None:
        error = SinkError(name, exc)
        self.errors.append(f"{step}: {error}")
        self._logger.error("%s during %s", error, step)
        self._on_error(name)
        self._live = [(n, s) for n, s in self._live if s is not sink]
        self._alive = self._records()
