"""``receiver consume``: the reference consumer of the ``redis`` sink.

Each worker of a consumer group claims streams from ``P:control`` (Redis hands each ``start``
entry to one worker of the group), follows the claimed stream's own keys with ``XREAD`` and
rebuilds every track as a WAV file, sample-exact: each audio entry says where its samples go, so
a missing stretch (trimmed, dropped by a lagging receiver, lost in a Redis outage) becomes zeros
of its length and a repeated one is written once; ``gap`` entries mark what the receiver dropped
in ``stream.json``. The files are finished on the stream's ``stop`` entry, and only then is its
``start`` acknowledged: a worker that dies leaves it pending, another worker claims it after
``--claim-idle-s`` and rebuilds the stream from its first entry. ``--levels`` prints each track's
level once a second, instead of the files or beside them.

Modules: ``command`` (the CLI), ``worker`` (claiming and following streams), ``rebuild`` (one
stream's files), ``levels``, ``replies`` (Redis reply shapes). The entry format is
``receiver.sinks.redis.wire`` (``docs/redis.md``).
"""

from receiver.consume.command import add_consume_parser, main, run
from receiver.consume.rebuild import StreamJob, TrackWriter
from receiver.consume.worker import ConsumeOptions, Consumer

__all__ = [
    "ConsumeOptions",
    "Consumer",
    "StreamJob",
    "TrackWriter",
    "add_consume_parser",
    "main",
    "run",
]
