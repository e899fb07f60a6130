"""Exponential backoff with jitter, for the loops that retry transient failures (relay, consumer, LISTEN).

Hand-written rather than taken from tenacity or backoff: those wrap one call in a retry decorator, while our
loops keep one backoff across fetching, committing and waiting on stop events; six lines of equal jitter
(AWS's name for half fixed, half random) need no dependency.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays that double from ``initial`` up to ``maximum``, each drawn from its upper half at random.

    The jitter spreads the retries of many processes that failed together (a database restart), so they do
    not come back in lockstep.
    """

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self._ceiling = initial

    def next(self) -> float:
        """The next delay, in seconds; the one after it is up to twice as long."""
        ceiling = self._ceiling
        self._ceiling = min(ceiling * 2, self._maximum)
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Start again from ``initial``: the failure is over."""
        self._ceiling = self._initial
