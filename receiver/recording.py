"""One stream's life without the network: messages in, sinks fed, an end and its close code out.

``StreamRecording`` takes a connection's text messages in batches (``receive``), runs them
through the parser (``receiver.protocol``) and the session (``receiver.session``) into the sinks
(``receiver.sinks.Fanout``), and says when the stream ends and with which close code; ``finish``
flushes, writes the summary and closes every sink, however the stream ended. ``end_for_close``
says what a close the stream did not announce with ``stop`` means (a client close, a lost
connection, a refused frame, a keepalive timeout, a shutdown).

No sockets, no websockets connection, no tasks: the shell (``receiver.server``) moves bytes and
applies timeouts, so that every rule here is tested with the memory sink in microseconds
(``tests/test_recording.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, assert_never

from websockets.frames import Close

from receiver.codecs import codec_for
from receiver.events import Connected, Dtmf, Event, Mark, Media, Start, Stop, UnknownEvent
from receiver.exceptions import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    MAX_CLOSE_REASON_BYTES,
    ProtocolError,
    RecordingFailed,
    UnsupportedMedia,
)
from receiver.logs import StreamLogger
from receiver.metrics import Count, Counters, ReceiverMetrics
from receiver.protocol import State, StreamProtocol
from receiver.session import PLACES_RUNS, AudioBatch, Session
from receiver.settings import Settings
from receiver.sinks import Fanout, SinkFactory, StreamInfo, StreamSummary
from receiver.sinks.base import StreamEnd

if TYPE_CHECKING:
    from receiver.status import StatusCallbacks
from receiver.text import shorten

__all__ = ["StreamRecording", "end_for_close"]

# The stream's lines keep the logger they always had (operators filter on it), though the
# rules that write them moved here from the shell.
logger = logging.getLogger("receiver.server")

# Close codes websockets sends when it refuses a frame: bad framing, invalid UTF-8, too big.
_FRAME_ERRORS = frozenset({1002, 1007, 1009})

Log = logging.Logger | logging.LoggerAdapter[Any]


class StreamRecording:
    """One stream, from its first message to its last file: the rules, none of the I/O.

    ``receive`` is called with each batch of messages (from the connection's
    ``data_received`` on the fast path: it never blocks) and returns the stream's end when the
    batch ends it; ``finish`` is awaited once, whatever ended the stream. ``session`` (None
    before ``start`` or for an encoding that cannot be decoded), ``info`` (None before
    ``start``) and ``messages`` (a count) are read by the shell while the stream runs.
    """

    def __init__(
        self,
        settings: Settings,
        sink_factories: Sequence[tuple[str, SinkFactory]],
        *,
        counters: Counters,
        metrics: ReceiverMetrics,
        path: str,
        query: str,
        remote: str | None,
        platform: StatusCallbacks | None = None,
    ) -> None:
        self.settings = settings
        # The platform's status callbacks for this stream, joined to its summary at the end.
        self.platform = platform
        self.sink_factories = sink_factories
        self.counters = counters
        self.metrics = metrics
        self.path = path
        self.query = query
        self.remote = remote
        self.protocol = StreamProtocol(
            max_custom_parameters=settings.max_custom_parameters,
            max_parameter_chars=settings.max_parameter_chars,
            max_name_chars=settings.max_name_chars,
        )
        self.session: Session | None = None
        self.fanout: Fanout | None = None
        self.info: StreamInfo | None = None
        self.messages = 0
        self.unknown_events: dict[str, None] = {}
        self.unknown_events_dropped = 0
        self.clock_shifted = False  # logged once a stream
        self.log: Log = StreamLogger(logger, {"stream_sid": "-"})
        self.end: StreamEnd | None = None  # the first end receive returned

    def receive(self, messages: Sequence[str | bytes]) -> StreamEnd | None:
        """Parse, place and write a batch of messages; the stream's end if the batch ends it.

        The end is ``stop`` (1000), a ``protocol-error`` (counted, logged, with the error's
        close code and reason), or an ``error``: no sink left to record (1011), or a bug of
        ours (1011, counted, logged with its traceback). Messages after the end in the batch
        are not looked at, nor are later batches: they get the same end back.
        """
        if self.end is None:
            self.end = self._end_of(messages)
        return self.end

    def _end_of(self, messages: Sequence[str | bytes]) -> StreamEnd | None:
        try:
            return self._receive(messages)
        except ProtocolError as exc:
            self.counters.add(Count.PROTOCOL_ERRORS, exc.kind)
            self.log.warning("closing with %d: %s", exc.close_code, shorten(exc.reason, 160))
            return StreamEnd("protocol-error", exc.close_code, exc.close_reason)
        except RecordingFailed as exc:
            return self._recording_failed(exc)
        except Exception:
            self.counters.add(Count.INTERNAL_ERRORS)
            self.log.exception("internal error")
            return StreamEnd("error", CLOSE_INTERNAL_ERROR, "internal error")

    def _receive(self, messages: Sequence[str | bytes]) -> StreamEnd | None:
        # Bound once a batch, counted once a batch: the loop does per frame only what it must,
        # and steady frames go through the session's run in C, many a call.
        protocol, receive = self.protocol, self.protocol.receive
        place = run = None
        if self.session is not None:
            place, run = self.session.media, self._run(self.session)
        i, n = 0, len(messages)
        try:
            while i < n:
                if run is not None and protocol.state is State.STREAMING:
                    i, batches = run(messages, i)
                    if batches:  # one frame in ten at 20 ms frames and 200 ms batches
                        self._write(batches)
                        continue
                    if i >= n:
                        break
                message = messages[i]
                i += 1
                event = receive(message)
                if type(event) is Media and place is not None:  # what the run left
                    batches = place(event)
                    if batches:
                        self._write(batches)
                    continue
                end = self._event(event)
                if end is not None:
                    return end
                if place is None and self.session is not None:  # the start made it
                    place, run = self.session.media, self._run(self.session)
            return None
        finally:
            self.messages += i

    @staticmethod
    def _run(session: Session) -> Callable[..., tuple[int, Sequence[AudioBatch]]] | None:
        return session.place_run if PLACES_RUNS else None

    def _write(self, batches: Sequence[AudioBatch]) -> None:
        assert self.session is not None and self.fanout is not None
        for batch in batches:
            self.fanout.write(batch.track, batch.position, batch.samples)
        if not self.fanout.alive:
            raise RecordingFailed(self.fanout.errors)
        if not self.clock_shifted and self.session.clock_shifts:
            self.clock_shifted = True  # seen with the next batch at the latest
            self.log.warning(
                "a frame's timestamp or chunk jumped past RECEIVER_MAX_GAP_S or "
                "RECEIVER_MAX_SILENCE_S: silence kept to the limit, the track's clock shifted "
                "(clock_jumps, silence_capped in stream.json)"
            )

    def _event(self, event: Event) -> StreamEnd | None:
        """Any event but a frame the session places: the stream's end if it ends it."""
        match event:
            case Media():  # not reached: the loop places every Media once the start made the
                # session (a media before it is refused by the protocol); kept for assert_never
                assert self.session is not None
                self._write(self.session.media(event))
            case Start():
                self._start(event)
            case Dtmf():
                assert self.session is not None and self.fanout is not None
                dtmf = self.session.on_dtmf(event)
                if dtmf is None:
                    self._dropped("dtmf", self.session.dropped.dtmf, self.settings.max_dtmf)
                else:
                    self.fanout.event(dtmf)
            case Mark():
                assert self.session is not None and self.fanout is not None
                dropped = self.session.dropped
                cut = dropped.mark_names_cut
                mark = self.session.on_mark(event)
                if mark is None:
                    self._dropped("marks", dropped.marks, self.settings.max_marks)
                else:
                    if dropped.mark_names_cut > cut:
                        self._dropped("mark_names_cut", dropped.mark_names_cut, 0)
                    self.fanout.event(mark)
            case Stop():
                self.log.info("stop received")
                # The connection's close after a stop is 1000 (ours, or the client's echoed).
                return StreamEnd("stop", 1000, None)
            case Connected():
                pass
            case UnknownEvent(name=name):
                self.counters.add(Count.UNKNOWN_EVENTS)
                if name in self.unknown_events:
                    pass
                elif len(self.unknown_events) < self.settings.max_unknown_events:
                    self.unknown_events[name] = None
                    self.log.info("skipping unknown event %r", shorten(name))
                else:
                    self.unknown_events_dropped += 1
                    self._dropped(
                        "unknown_event_names",
                        self.unknown_events_dropped,
                        self.settings.max_unknown_events,
                    )
            case _:
                assert_never(event)
        return None

    def _dropped(self, what: str, count: int, limit: int) -> None:
        """Count what a stream sent past a bound; log the first time only."""
        self.counters.add(Count.DROPPED, what)
        if count == 1:
            bound = f"past {limit}" if limit else "too long"
            self.log.warning("%s %s a stream: counted in stream.json, dropped", what, bound)

    def _start(self, start: Start) -> None:
        """Open the sinks and the session; an undecodable format still gets its record."""
        self.log = StreamLogger(logger, {"stream_sid": shorten(start.stream_sid)})
        codec, unsupported = None, None
        try:
            codec = codec_for(start.media_format, l16_byte_order=self.settings.l16_byte_order)
        except UnsupportedMedia as exc:
            unsupported = exc
        self.info = StreamInfo(
            start=start,
            path=self.path,
            query=self.query,
            remote=self.remote,
            started_at=datetime.now(UTC),
            codec=codec,
            unsupported_reason=unsupported.reason if unsupported else None,
        )
        sinks = [(name, factory(self.settings)) for name, factory in self.sink_factories]
        write_seconds = self.metrics.sink_write_seconds
        self.fanout = Fanout(
            sinks,
            logger=self.log,
            on_error=lambda name: self.counters.add(Count.SINK_ERRORS, name),
            on_write_seconds=lambda name: write_seconds.labels(name).observe,
        )
        self.counters.add(Count.STREAMS)
        if self.platform is not None:  # paired with stream_finished in finish()
            self.platform.stream_started(start.stream_sid)
        self.log.info(
            "stream started: %s %d Hz, tracks %s",
            shorten(start.media_format.encoding),
            start.media_format.sample_rate_hz,
            shorten(",".join(start.tracks)),
        )
        self.fanout.open(self.info)
        if not self.fanout.alive:
            raise RecordingFailed(self.fanout.errors)
        if unsupported is not None:
            raise unsupported
        assert codec is not None
        self.session = Session(
            start,
            codec=codec,
            batch_ms=self.settings.batch_ms,
            max_duration_s=self.settings.max_stream_duration_s,
            max_gap_s=self.settings.max_gap_s,
            max_silence_s=self.settings.max_silence_s,
            max_marks=self.settings.max_marks,
            max_dtmf=self.settings.max_dtmf,
            max_name_chars=self.settings.max_name_chars,
        )

    def _recording_failed(self, exc: RecordingFailed) -> StreamEnd:
        """Count, log and describe the end of a stream that no sink is left to record."""
        self.counters.add(Count.RECORDING_FAILURES)
        reason = shorten(str(exc), MAX_CLOSE_REASON_BYTES)
        self.log.error("closing with %d: %s", exc.close_code, reason)
        return StreamEnd("error", exc.close_code, reason)

    def closed(
        self,
        rcvd: Close | None,
        sent: Close | None,
        rcvd_then_sent: bool | None,
        *,
        keepalive_expired: bool,
        write_overflow: bool,
        draining: bool,
    ) -> StreamEnd:
        """``end_for_close`` with this stream's settings, counters and logger."""
        return end_for_close(
            rcvd,
            sent,
            rcvd_then_sent,
            keepalive_expired=keepalive_expired,
            write_overflow=write_overflow,
            draining=draining,
            ping_timeout_s=self.settings.ping_timeout_s,
            counters=self.counters,
            log=self.log,
        )

    async def finish(self, end: StreamEnd) -> StreamEnd:
        """Flush what is pending and close every sink, whatever happened before (those with an
        ``aclose`` awaited, off the event loop's critical path); count the end, fold the
        stream into the metrics, log its last line. Call it once.

        Returns how the stream ended: a stop after which no sink is left is a failed recording.
        A stream that never started has nothing to finish: ``end`` comes back as it is.
        """
        if self.fanout is None or self.info is None:
            return end
        session, fanout = self.session, self.fanout
        if session is not None:
            for batch in session.flush():
                fanout.write(batch.track, batch.position, batch.samples)
        if end.kind == "stop" and not fanout.alive:
            end = self._recording_failed(RecordingFailed(fanout.errors))
        self.counters.add(Count.STREAMS_ENDED, end.kind)
        rate = session.rate if session else self.info.start.media_format.sample_rate_hz
        sid = self.info.start.stream_sid
        platform = self.platform.platform_fields(sid) if self.platform is not None else {}

        def summary(sink_errors: tuple[str, ...]) -> StreamSummary:
            return StreamSummary(
                end=end,
                ended_at=datetime.now(UTC),
                sample_rate_hz=rate,
                tracks=session.track_stats if session else {},
                dtmf=tuple(session.dtmf) if session else (),
                marks=tuple(session.marks) if session else (),
                messages=self.messages,
                unknown_events=tuple(self.unknown_events),
                dropped={
                    **(session.dropped.as_dict() if session else {}),
                    "unknown_event_names": self.unknown_events_dropped,
                },
                sink_errors=sink_errors,
                platform=platform,
            )

        await fanout.aclose(summary)  # stream.json is written off the event loop
        if self.platform is not None:  # a callback from now on updates stream.json itself
            await self.platform.stream_finished(sid, fanout.directory)
        stats = session.track_stats if session else {}
        duration_s = (datetime.now(UTC) - self.info.started_at).total_seconds()
        self.metrics.stream_finished(session.codec.name if session else "none", stats, duration_s)
        tracks = ", ".join(
            f"{t} {s.samples / rate:.2f} s ({s.gaps} gaps)" for t, s in stats.items()
        )
        fields = {
            "end": end.kind,
            "close_code": end.close_code,
            "duration_s": round(duration_s, 3),
            "messages": self.messages,
            "tracks": {
                t: {"duration_s": round(s.samples / rate, 3), "gaps": s.gaps}
                for t, s in stats.items()
            },
            "files": list(fanout.locations),
        }
        self.log.info(
            "stream ended (%s) after %.1f s: %s%s",
            end.kind,
            duration_s,
            tracks or "no audio",
            "".join(f"; {where}" for where in fanout.locations),
            extra={"fields": fields},
        )
        return end


def end_for_close(
    rcvd: Close | None,
    sent: Close | None,
    rcvd_then_sent: bool | None,
    *,
    keepalive_expired: bool,
    write_overflow: bool,
    draining: bool,
    ping_timeout_s: float,
    counters: Counters,
    log: Log,
) -> StreamEnd:
    """What a connection's close means for a stream that did not end with ``stop``.

    ``rcvd`` and ``sent`` are the close frames received and sent (None: none),
    ``rcvd_then_sent`` whether the client closed first (websockets' ``ConnectionClosed``
    carries all three). In order: our keepalive expired (1011), we aborted a client that does
    not read (1006), our shutdown's 1001, websockets refused a frame (1002, 1007, 1009: a
    protocol error, counted), else the client's close (its code, 1006 without a close frame).
    """
    if keepalive_expired:
        reason = f"no pong within {ping_timeout_s:g} s"
        log.warning("closing with 1011: %s", reason)
        return StreamEnd("keepalive-timeout", CLOSE_INTERNAL_ERROR, reason)
    if write_overflow:
        reason = "aborted: the client did not read what we sent"
        return StreamEnd("client-close", 1006, reason)
    if draining and sent is not None and sent.code == CLOSE_GOING_AWAY:
        return StreamEnd("shutdown", CLOSE_GOING_AWAY, "server shutting down")
    if sent is not None and not rcvd_then_sent and sent.code in _FRAME_ERRORS:
        # websockets refused a frame itself: too big, invalid UTF-8, bad framing.
        counters.add(Count.PROTOCOL_ERRORS, "frame")
        log.warning("closed with %d: %s", sent.code, shorten(sent.reason, 160))
        return StreamEnd("protocol-error", sent.code, sent.reason)
    code = rcvd.code if rcvd is not None else 1006
    reason = rcvd.reason if rcvd is not None else "connection lost without a close frame"
    log.info("client closed (%d) without stop", code)
    return StreamEnd("client-close", code, reason)
