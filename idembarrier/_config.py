"""Configuration: what a barrier may be told, frozen once it is built."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from types import MappingProxyType

from ._exceptions import ConfigurationError

__all__ = [
    "DEFAULT_CLEANUP_TIMEOUT",
    "DEFAULT_LEASE",
    "DEFAULT_RECORD_RETENTION",
    "DEFAULT_RETENTION",
    "DEFAULT_TABLE",
    "DEFAULT_WAIT_TIMEOUT",
    "ExpiredReplay",
    "OnConflict",
    "Options",
    "Retention",
    "as_retention",
    "check_wait_timeout",
]

DEFAULT_TABLE = "idempotency_keys"
"""The records table's name; the outbox, failures and version tables are named after it."""
DEFAULT_WAIT_TIMEOUT = 10.0
"""Longest wait, in seconds, for a concurrent holder of a key."""
DEFAULT_CLEANUP_TIMEOUT = 0.5
"""Longest wait, in seconds, for the rollback after a failure or a cancellation."""
DEFAULT_LEASE = timedelta(seconds=30)
"""How long a lease stays its holder's without renewal."""
DEFAULT_RETENTION = timedelta(days=7)
"""How long a finished record keeps its response: a week covers the replay horizon of most brokers (Kafka's
default log retention is 7 days) and of clients retrying after an outage."""
DEFAULT_RECORD_RETENTION = timedelta(days=30)
"""How long the compact record (scope, key, fingerprint, status, timestamps) outlives its response."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """The two horizons of a finished record, counted from its completion.

    Attributes:
        response: Until then the record replays its response; after it cleanup drops the response.
        record: Until then the compact record remains, so a late replay is detected (never silently run
            again); after it cleanup deletes the record and the key is new again.
    """

    response: timedelta = DEFAULT_RETENTION
    record: timedelta = DEFAULT_RECORD_RETENTION

    def __post_init__(self) -> None:
        for name in ("response", "record"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value < timedelta(0):
                raise ConfigurationError(f"retention {name} must be a non-negative timedelta, not {value!r}")
        if self.record < self.response:
            raise ConfigurationError(
                f"the record retention ({self.record}) is shorter than the response retention "
                f"({self.response}): a record cannot go before its response"
            )


def as_retention(value: timedelta | Retention) -> Retention:
    """A `Retention` from itself, or from a response retention (the record kept at least 30 days)."""
    if isinstance(value, Retention):
        return value
    if not isinstance(value, timedelta):
        raise ConfigurationError(f"retention must be a timedelta or a Retention, not {value!r}")
    return Retention(response=value, record=max(value, DEFAULT_RECORD_RETENTION))


class ExpiredReplay(StrEnum):
    """What a call does when its key's record remains but its response was dropped (past retention)."""

    REJECT = "reject"
    """Raise `ResponseExpiredError` (HTTP 409): the request was made, its answer is gone."""
    ALLOW = "allow"
    """Run again, as a new request, in the same transaction that takes the record over."""
    ALERT = "alert"
    """Run again, and count it as a late replay (``Outcome.LATE_REPLAY``) for alerting."""


class OnConflict(StrEnum):
    """What a call does when a concurrent duplicate holds its key."""

    WAIT = "wait"
    """Block until the holder finishes: replay its outcome if it committed, run if it rolled back."""
    FAIL = "fail"
    """Raise `KeyInProgressError` at once, without waiting (HTTP 409)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """The settings of a `Barrier`; each may be overridden per call where the call takes it.

    Attributes:
        table: Name of the records table.
        schema: PostgreSQL schema of the records table (``None``: the search path).
        on_conflict: What a concurrent duplicate does.
        wait_timeout: Longest wait, in seconds, for a concurrent holder under ``OnConflict.WAIT``.
        retention: The horizons of finished records.
        retention_by_scope: Horizons for particular scopes, overriding ``retention``.
        on_expired_replay: What a replay that finds only the compact record does.
        max_replay_window: The longest a replay may come after its request (Kafka retention, the bound on
            consumer lag, a DLQ's redrive horizon). Refused when a record retention is shorter.
        check_schema: Verify on first use that the table is at the migrations' head.
        cleanup_timeout: Longest wait, in seconds, for the rollback after a failure or a cancellation; a
            connection that does not answer within it is invalidated (closed, never pooled again).
        replay_from_memory: Answer a replay from the finished record a lookup read in this process, while
            its response lasts, without the database (`idembarrier._memory`).
    """

    table: str = DEFAULT_TABLE
    schema: str | None = None
    on_conflict: OnConflict = OnConflict.WAIT
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT
    retention: Retention = field(default_factory=Retention)
    retention_by_scope: Mapping[str, Retention] = field(default_factory=dict)
    on_expired_replay: ExpiredReplay = ExpiredReplay.REJECT
    max_replay_window: timedelta | None = None
    check_schema: bool = True
    cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT
    replay_from_memory: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_conflict", OnConflict(self.on_conflict))
        object.__setattr__(self, "on_expired_replay", ExpiredReplay(self.on_expired_replay))
        object.__setattr__(self, "retention_by_scope", MappingProxyType(dict(self.retention_by_scope)))
        check_wait_timeout(self.wait_timeout)
        cleanup = self.cleanup_timeout
        if not (isinstance(cleanup, int | float) and math.isfinite(cleanup) and cleanup > 0):
            raise ConfigurationError(f"cleanup_timeout must be a positive number of seconds, not {cleanup!r}")
        window = self.max_replay_window
        if window is not None and not (isinstance(window, timedelta) and window >= timedelta(0)):
            raise ConfigurationError(f"max_replay_window must be a non-negative timedelta, not {window!r}")
        if window is not None:
            for scope, retention in [("every scope", self.retention), *self.retention_by_scope.items()]:
                if retention.record < window:
                    raise ConfigurationError(
                        f"records of {scope} are kept {retention.record}, less than the maximum replay window "
                        f"{window}: a replay arriving after {retention.record} would find no record and run "
                        "again. Keep records at least as long as replays can come (Retention(record=...))"
                    )

    def retention_for(self, scope: str) -> Retention:
        """The horizons of ``scope``'s records."""
        return self.retention_by_scope.get(scope, self.retention)


def check_wait_timeout(seconds: float) -> float:
    """Return ``seconds`` if it is a usable wait timeout, else raise `ValueError`."""
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
        raise ConfigurationError(f"wait_timeout must be a positive number of seconds, not {seconds!r}")
    return float(seconds)
