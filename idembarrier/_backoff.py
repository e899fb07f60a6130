"""Exponential backoff with jitter, for the loops that retry transient failures (relay, consumer, LISTEN).

Hand-written rather than taken from tenacity or backoff: those wrap one call in a retry decorator, while our
loops keep one backoff across fetching, committing and waiting on stop events; six lines of equal jitter
(AWS's name for half fixed, half random) need no dependency.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    import logging

__all__ = ["Backoff", "Retries", "cancel_on"]


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


class Retries:
    """A consumer loop's consecutive transient failures: counted, given up past ``limit``, waited out.

    Every broker's loop retries the same way: a failure is logged with its delay, the loop waits that long
    (or until ``stop`` is set), and past ``limit`` consecutive failures the last one's cause propagates.
    ``reset`` once something goes through.
    """

    def __init__(self, backoff: Backoff, limit: int | None, stop: anyio.Event | None, log: logging.Logger) -> None:
        self.backoff, self.limit, self.stop, self.log = backoff, limit, stop, log
        self.count = 0

    def failed(self, cause: BaseException, what: str, delay: float | None = None) -> float:
        """Count a failure of ``what``; re-raise ``cause`` past the limit; return the delay to wait (logged)."""
        self.count += 1
        if self.limit is not None and self.count > self.limit:
            raise cause
        delay = self.backoff.next() if delay is None else delay
        self.log.warning("idembarrier: %s failed (%r); retrying in %.2fs", what, cause, delay)
        return delay

    async def wait(self, delay: float) -> None:
        """Wait ``delay`` seconds, or until ``stop`` is set."""
        with anyio.move_on_after(delay):
            if self.stop is not None:
                await self.stop.wait()
            else:
                await anyio.sleep_forever()

    async def after(self, cause: BaseException, what: str) -> None:
        """`failed`, then `wait` its delay."""
        await self.wait(self.failed(cause, what))

    def reset(self) -> None:
        """Something went through: count from 0 and back off from the first delay again."""
        self.count = 0
        self.backoff.reset()


async def cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once ``event`` is set (a loop's fetch, given up on a stop)."""
    await event.wait()
    scope.cancel()
