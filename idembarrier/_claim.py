"""What a record found by a claim means: the one decision units of work and leases share.

A claim that does not insert meets an existing record. Whether the call replays it, takes it over, waits
for its holder or gives up is decided here, and only here (the storage reads the record; the caller acts):

====================================  ===========================================================
the record found                      decision
====================================  ===========================================================
another fingerprint                   `FingerprintMismatchError` (the key was used for another request)
a fingerprint version not registered  `FingerprintVersionError` (it cannot tell a retry from another request)
UNKNOWN                               `ReconciliationRequiredError` (a person resolves it)
IN_PROGRESS, its lease stale          `Decision.RECLAIM` (leases; a unit of work never sees one stale)
IN_PROGRESS                           `Decision.WAIT` (a unit of work raises `KeyInProgressError`)
finished, compact, policy REJECT      `ResponseExpiredError` (the request was made, its answer is gone)
finished, compact, policy ALLOW/ALERT `Decision.RETAKE` (run again, in the transaction that takes it)
finished                              `Decision.REPLAY`
====================================  ===========================================================
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from ._config import ExpiredReplay
from ._exceptions import FingerprintMismatchError, ReconciliationRequiredError, ResponseExpiredError
from ._record import Status

if TYPE_CHECKING:
    from ._keys import Fingerprint
    from ._record import Record

__all__ = ["Decision", "decide"]


class Decision(Enum):
    """What a call does with the record its claim found (see the table above)."""

    REPLAY = "replay"
    """Answer from the finished record; run nothing."""
    RETAKE = "retake"
    """Take the compact record over and run again (a late request the policy lets through)."""
    RECLAIM = "reclaim"
    """Take the stale lease over, with a new token."""
    WAIT = "wait"
    """Someone holds the key right now: wait for it, or give up with `KeyInProgressError`."""


def decide(
    record: Record, *, fingerprint: Fingerprint, on_expired_replay: ExpiredReplay, stale: bool = False
) -> Decision:
    """Decide what the call with ``fingerprint`` does with ``record``, found by its claim.

    Args:
        record: The record the claim met.
        fingerprint: The calling request's fingerprint (compared by the version that made the record's).
        on_expired_replay: The policy for a compact record. Leases pass ``REJECT``: they never take a
            compact record over (their external effects happened; running again would repeat them).
        stale: Whether the record's lease ran out by the database's clock.

    Raises:
        FingerprintMismatchError: The record was made for another request.
        FingerprintVersionError: The record was fingerprinted by a version the barrier does not register.
        ReconciliationRequiredError: The record is UNKNOWN.
        ResponseExpiredError: The record is compact and the policy rejects late replays.
    """
    if not fingerprint.matches(record):
        raise FingerprintMismatchError(scope=record.scope, key=record.key, record=record)
    if record.status is Status.UNKNOWN:
        raise ReconciliationRequiredError(scope=record.scope, key=record.key, record=record)
    if not record.status.finished:
        return Decision.RECLAIM if stale else Decision.WAIT
    if record.compact:
        if on_expired_replay is ExpiredReplay.REJECT:
            raise ResponseExpiredError(scope=record.scope, key=record.key, record=record)
        return Decision.RETAKE
    return Decision.REPLAY
