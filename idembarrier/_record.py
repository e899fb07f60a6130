"""What a record is: its status and the immutable snapshot of a row that idembarrier hands out.

A record's life, every transition there is (what a claim that meets a record does is decided in
`idembarrier._claim`)::

    claim              (none)                    → IN_PROGRESS
    complete / fail    IN_PROGRESS               → COMPLETED | FAILED
    release            IN_PROGRESS               → (none)              the lease holder gives the key up
    reclaim            IN_PROGRESS, stale        → IN_PROGRESS         new token, attempt + 1
    past max_reclaims  IN_PROGRESS, stale        → UNKNOWN
    resolve            UNKNOWN | IN_PROGRESS, stale → COMPLETED | FAILED   an operator's outcome
    compact            COMPLETED | FAILED        → compact             the response dropped past its retention
    retake             compact                   → COMPLETED | FAILED  a late request under ALLOW or ALERT runs again
    purge              COMPLETED | FAILED        → (none)              past the record's retention

A unit of work's IN_PROGRESS row never commits: it commits already finished, or rolls back with the
body. Only leases commit IN_PROGRESS.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

__all__ = ["Record", "Status"]


class Status(StrEnum):
    """The state of a record.

    ``IN_PROGRESS`` only ever commits for leased work; a unit of work's claim row is IN_PROGRESS inside its
    own transaction and becomes COMPLETED or FAILED before that transaction commits. ``UNKNOWN`` is reserved
    for records that need reconciliation by a person.
    """

    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        """Whether the record holds an outcome that replays (COMPLETED or FAILED)."""
        return self is Status.COMPLETED or self is Status.FAILED


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """A snapshot of one row of the records table, as read by idembarrier.

    Attributes:
        scope: The namespace of the key (a tenant, an operation, a consumer group).
        key: The idempotency key, unique within its scope.
        status: Where the record stands.
        fingerprint: SHA-256 digest of the canonical request, or ``None`` when none was given.
        fingerprint_version: The `FingerprintVersions` version that made ``fingerprint``, or ``None``
            (a barrier without versions, or a record made before versions were adopted).
        response: The encoded response (COMPLETED or FAILED), or ``None``.
        token: The claim token of the holder that wrote the record.
        attempt: How many times the key was claimed (1 unless a lease was reclaimed).
        created_at: When the record was claimed (database clock).
        completed_at: When it reached COMPLETED or FAILED (database clock).
        expires_at: From when cleanup may delete it; never consulted for deduplication.
        response_expires_at: From when cleanup may drop its response, keeping the compact record (read
            by `Barrier.inspect` and `Barrier.records` only; ``None`` elsewhere).
        locked_until: End of the current lease (leased work only; database clock).
        checkpoint: Name of the last checkpoint a lease holder recorded, if any.
        checkpoint_data: The codec's bytes recorded with that checkpoint.
        stale: Whether, when it was read, its lease had run out by the database's clock (IN_PROGRESS only).
        response_expires_in: Seconds its response had left before ``response_expires_at``, by the database's
            clock, when a lookup read it (negative once past; ``None`` elsewhere and for records without one).
    """

    scope: str
    key: str
    status: Status
    fingerprint: bytes | None
    response: bytes | None
    token: uuid.UUID
    attempt: int
    created_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None
    locked_until: datetime | None = None
    response_expires_at: datetime | None = None
    checkpoint: str | None = None
    checkpoint_data: bytes | None = None
    stale: bool = False
    fingerprint_version: int | None = None
    response_expires_in: float | None = None

    @property
    def compact(self) -> bool:
        """Whether only the compact record remains: finished, its response dropped past retention."""
        return self.status.finished and self.response is None
