"""What the barrier counts: outcomes per call in this process, and the records' status distribution."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum

from ._exceptions import (
    FingerprintMismatchError,
    KeyInProgressError,
    ReconciliationRequiredError,
    ResponseExpiredError,
)
from ._record import Status

__all__ = ["Outcome", "Stats", "outcome_of"]


class Outcome(StrEnum):
    """How a call to `Barrier.unit_of_work` or `Barrier.leased` ended at its claim."""

    EXECUTED = "executed"
    """It claimed the key and ran the body."""
    REPLAYED = "replayed"
    """It found the key's outcome and replayed it (an idempotency hit)."""
    IN_PROGRESS = "in_progress"
    """A concurrent holder kept the key (`KeyInProgressError`)."""
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    """The key was used for another request (`FingerprintMismatchError`)."""
    UNRESOLVED = "unresolved"
    """The key is UNKNOWN (`ReconciliationRequiredError`)."""
    LATE_REPLAY = "late_replay"
    """A replay found only the compact record: its response was past retention."""
    STALE_RECLAIM = "stale_reclaim"
    """A stale lease was taken over (counted in addition to the caller's own outcome)."""
    DEAD_LETTERED = "dead_lettered"
    """A consumed message was given up on (poison) and sent to its dead letter (`run_consumer`)."""


def outcome_of(exc: BaseException) -> Outcome | None:
    """The outcome an exception from a claim stands for, if it stands for one."""
    if isinstance(exc, KeyInProgressError):
        return Outcome.IN_PROGRESS
    if isinstance(exc, FingerprintMismatchError):
        return Outcome.FINGERPRINT_MISMATCH
    if isinstance(exc, ReconciliationRequiredError):
        return Outcome.UNRESOLVED
    if isinstance(exc, ResponseExpiredError):
        return Outcome.LATE_REPLAY
    return None


@dataclass(frozen=True, slots=True)
class Stats:
    """The barrier's numbers, as `Barrier.stats` returns them.

    Attributes:
        outcomes: Calls per outcome since this barrier was built (this process only).
        statuses: Records per status in the table now (every process).
        oldest_in_progress: Age of the oldest IN_PROGRESS record (database clock), ``None`` if none.
        outbox_pending: Messages in the outbox not yet sent, parked ones included (every process).
        outbox_parked: Of those, the ones the relay parked after repeated refusals: each holds its key back.
    """

    outcomes: Counter[Outcome] = field(default_factory=Counter)
    statuses: dict[Status, int] = field(default_factory=dict)
    oldest_in_progress: timedelta | None = None
    outbox_pending: int = 0
    outbox_parked: int = 0

    @property
    def hit_rate(self) -> float | None:
        """Replayed calls over calls that executed or replayed (``idempotency.hit.rate``); ``None`` if none."""
        hits, runs = self.outcomes[Outcome.REPLAYED], self.outcomes[Outcome.EXECUTED]
        return hits / (hits + runs) if hits + runs else None
