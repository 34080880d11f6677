"""The sizes of the long runs, set from pytest options by ``tests/conftest.py``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LongRuns:
    """Sizes of the long runs, from pytest options (``scripts/fuzz`` and ``scripts/soak`` pass
    them); the defaults are the suite's short versions. Set in ``pytest_configure``, before any
    test module is imported, so that test modules may size their decorators from them."""

    fuzz_examples: int = 0
    fuzz_report: str | None = None
    soak_connections: int = 100
    soak_seed: int = 20241125
    soak_report: str | None = None


LONG_RUNS = LongRuns()
