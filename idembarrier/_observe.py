"""What one call tells its watchers when it ends: the `Observation`, its key hash, and the decision log.

A unit of work or a lease notes the time at a few points (`Phases`) and, when it ends, the runtime builds
one `Observation` from them, but only if someone looks: a watcher (``idembarrier.otel``) or the decision log
``idembarrier.decisions`` enabled at the record's level. Nobody looking costs a few clock readings.

The decision log is one `logging` record per call, on the ``idembarrier.decisions`` logger, at INFO: off
until a configuration enables that logger at INFO, and then free (no observation is built) when nothing
else looks. Its fields are in the record's ``extra`` (attributes of the `logging.LogRecord`):
`DECISION_FIELDS` names them. Neither the
record nor an observation holds the key or an exception's text (which names the key): only `key_hash`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from enum import StrEnum

from ._metrics import Outcome
from ._record import Status

__all__ = ["DECISION_FIELDS", "Observation", "Phases", "Work", "decisions", "key_hash", "log_decision"]

decisions = logging.getLogger("idembarrier.decisions")
"""The decision log's logger: one record per call."""

DECISION_FIELDS = (
    "work",
    "outcome",
    "scope",
    "key_hash",
    "attempt",
    "waited",
    "duration",
    "status",
    "error",
    "reclaimed",
)
"""The attributes each decision record carries (its ``extra``), as `Observation` names them."""


def key_hash(scope: str, key: str) -> str:
    """The key's digest in spans and log records: the first 16 hex digits of SHA-256 over scope, 0x1F, key.

    Stable across processes and releases, so an operator who has the key can compute it and find the key's
    spans and log records. It is the start of `downstream_key`'s digest too. A digest is not
    a secret: a guessable key (``order-42``) can be found from it by trying candidates.
    """
    return hashlib.sha256(f"{scope}\x1f{key}".encode()).hexdigest()[:16]


class Work(StrEnum):
    """What was observed."""

    UNIT_OF_WORK = "unit_of_work"
    """A `Barrier.unit_of_work` (or `Barrier.execute`) call, from its claim to its commit or rollback."""
    LEASE = "lease"
    """A `Barrier.leased` block, from its claim to the block's end (its fenced finish included)."""


class Phases:
    """The clock readings of one call: when it began, when its claim answered, when its body ended."""

    __slots__ = ("began", "began_at", "body_ended", "claimed")

    def __init__(self) -> None:
        self.began_at = time.time()
        self.began = time.perf_counter()
        self.claimed: float | None = None
        self.body_ended: float | None = None

    def claim(self) -> None:
        """Note that the claim answered (claimed, or found the record to replay)."""
        self.claimed = time.perf_counter()

    def end_body(self) -> None:
        """Note that the body ended (a unit of work's commit or rollback began; a lease's finish was asked)."""
        self.body_ended = time.perf_counter()


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """One call to the barrier, as it ended; what watchers and the decision log receive.

    Attributes:
        work: A unit of work or a lease.
        scope: The key's scope.
        key_hash: `key_hash` of the scope and key; never the key itself.
        outcome: How the call ended at its claim; ``None`` when the claim failed otherwise (a database error).
        attempt: The record's attempt: 1, or n + 1 for a lease reclaimed n times (a replay: the replayed record's).
        began_at: When the call began (seconds since the epoch).
        waited: Seconds from the call's beginning to the claim's answer, waits for a concurrent holder included.
        body_ended: Seconds from the beginning to the end of the body (its commit or rollback began; a lease:
            its ``finish()``), ``None`` if the body never ran or never ended so.
        duration: Seconds from the beginning to the end of the call.
        status: The status recorded (COMPLETED or FAILED) or replayed, when the call ended cleanly; else ``None``.
        error: The fully qualified name of the exception the call ended with, ``None`` if none; never its text.
        reclaimed: Whether a lease took a stale lease over.
    """

    work: Work
    scope: str
    key_hash: str
    outcome: Outcome | None
    attempt: int
    began_at: float
    waited: float
    body_ended: float | None
    duration: float
    status: Status | None
    error: str | None
    reclaimed: bool = False


def error_name(exc: BaseException | None) -> str | None:
    """The fully qualified name of ``exc``'s type, or ``None``.

    Builtins go by their bare name, and idembarrier's own by the name it exports them under
    (``idembarrier.KeyInProgressError``, not its private module's).
    """
    if exc is None:
        return None
    kind, module = type(exc), type(exc).__module__
    if module == "builtins":
        return kind.__qualname__
    if module.startswith("idembarrier._"):
        module = "idembarrier"
    return f"{module}.{kind.__qualname__}"


def observe(
    work: Work,
    phases: Phases,
    *,
    scope: str,
    key: str,
    outcome: Outcome | None,
    attempt: int,
    status: Status | None,
    error: BaseException | None,
    reclaimed: bool = False,
) -> Observation:
    """Build the observation of a call ending now."""
    ended = time.perf_counter()
    claimed = ended if phases.claimed is None else phases.claimed
    return Observation(
        work=work,
        scope=scope,
        key_hash=key_hash(scope, key),
        outcome=outcome,
        attempt=attempt,
        began_at=phases.began_at,
        waited=claimed - phases.began,
        body_ended=None if phases.body_ended is None else phases.body_ended - phases.began,
        duration=ended - phases.began,
        status=status if error is None else None,
        error=error_name(error),
        reclaimed=reclaimed,
    )


def log_decision(observation: Observation) -> None:
    """Write ``observation``'s decision record, if the decision log is enabled."""
    if not decisions.isEnabledFor(logging.INFO):
        return
    extra = {name: getattr(observation, name) for name in DECISION_FIELDS}
    # Plain strings for formatters that serialise what they find (JSON): the enums' values, not their reprs.
    extra["work"] = observation.work.value
    extra["outcome"] = "error" if observation.outcome is None else observation.outcome.value
    extra["status"] = None if observation.status is None else observation.status.value
    decisions.info(
        "%s %s: scope %r, key %s, attempt %d, waited %.3f s",
        extra["work"],
        extra["outcome"],
        observation.scope,
        observation.key_hash,
        observation.attempt,
        observation.waited,
        extra=extra,
    )
