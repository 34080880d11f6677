"""The fuzz properties' common ground: the Hypothesis profiles (a few hundred cases per property
in the suite, a measured total under ``scripts/fuzz``), the ``@fuzz`` decorator that counts every
case, and what every ProtocolError must look like."""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.errors import HypothesisException

from receiver.events import (
    Connected,
    Dtmf,
    Mark,
    Media,
    Start,
    Stop,
    UnknownEvent,
)
from receiver.exceptions import (
    LimitExceeded,
    MalformedMessage,
    ProtocolError,
    UnexpectedMessage,
    UnsupportedMedia,
)
from receiver.protocol import StreamProtocol
from tests.support.options import LONG_RUNS

# ---------------------------------------------------------------------------------------------
# Settings: a few hundred cases per property in the suite, a measured total under scripts/fuzz.

# pytest options, set before this module is imported (tests/conftest.py).
FUZZ_TOTAL = LONG_RUNS.fuzz_examples
# Properties decorated with @fuzz (in tests/test_fuzz_*.py); scripts/fuzz checks the measured
# total, so a property added without updating this number only shifts each one's share.
PROPERTIES = 23

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # Hypothesis caches (unicode tables, constants) outside the repository; no example database.
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "receiver-hypothesis")

_HEALTH = [
    # Whole streams of frames are large and slow to generate by design.
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
]
settings.register_profile(
    "receiver-suite",
    max_examples=200,
    database=None,
    deadline=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
settings.register_profile(
    "receiver-fuzz",
    max_examples=max(1, math.ceil(FUZZ_TOTAL * 1.1 / PROPERTIES)),
    database=None,
    deadline=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
PROFILE = settings.get_profile("receiver-fuzz" if FUZZ_TOTAL else "receiver-suite")

CASES: Counter[str] = Counter()
FAILURES: Counter[str] = Counter()
CRASHES: Counter[str] = Counter()


def fuzz(test: Callable[..., None]) -> Callable[..., None]:
    """Apply the profile and count every case run (and every one that failed or crashed)."""

    @functools.wraps(test)
    def counted(*args: Any, **kwargs: Any) -> None:
        name = test.__name__
        try:
            test(*args, **kwargs)
        except AssertionError:  # a property does not hold
            CASES[name] += 1
            FAILURES[name] += 1
            raise
        except HypothesisException:  # Hypothesis' own control flow: not a case
            raise
        except Exception:  # an exception nobody handled
            CASES[name] += 1
            CRASHES[name] += 1
            raise
        # (BaseException such as StopTest: the case ran out of generated data, not a case.)
        CASES[name] += 1

    return settings(PROFILE)(counted)


# ---------------------------------------------------------------------------------------------
# What every ProtocolError must look like.

CLOSE_CODES = {
    MalformedMessage: 1007,
    UnexpectedMessage: 1008,
    LimitExceeded: 1008,
    UnsupportedMedia: 1003,
}
EVENT_TYPES = (Connected, Start, Media, Dtmf, Mark, Stop, UnknownEvent)


def check_error(exc: ProtocolError) -> None:
    """A close code the server may send and a reason that fits a close frame."""
    assert exc.close_code in {1003, 1007, 1008}
    assert exc.close_code == CLOSE_CODES[type(exc)], type(exc)
    assert isinstance(exc.reason, str) and exc.reason
    assert len(exc.close_reason.encode("utf-8")) <= 123


def receive(protocol: StreamProtocol, message: str | bytes) -> Any:
    """The event, or the ProtocolError (checked); anything else propagates and fails the case."""
    try:
        event = protocol.receive(message)
    except ProtocolError as exc:
        check_error(exc)
        return exc
    assert isinstance(event, EVENT_TYPES), type(event)
    return event


def write_report(path: Path) -> None:
    """The cases run, counted, for scripts/fuzz."""
    path.write_text(
        json.dumps(
            {
                "cases": sum(CASES.values()),
                "failing_cases": sum(FAILURES.values()),
                "unhandled_exceptions": sum(CRASHES.values()),
                "per_property": dict(sorted(CASES.items())),
                "target": FUZZ_TOTAL,
            },
            indent=2,
        )
    )
