"""Configuration: what a barrier may be told, frozen once it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

__all__ = ["DEFAULT_RETENTION", "OnConflict", "Options"]

DEFAULT_RETENTION = timedelta(days=7)
"""How long a finished record is kept before cleanup may delete it: the minimum for Kafka-fed systems."""


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
        retention: How long a finished record is kept before cleanup may delete it (from completion).
        check_schema: Verify on first use that the table is at the migrations' head.
    """

    table: str = "idempotency_keys"
    schema: str | None = None
    on_conflict: OnConflict = OnConflict.WAIT
    wait_timeout: float = 10.0
    retention: timedelta = DEFAULT_RETENTION
    check_schema: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_conflict", OnConflict(self.on_conflict))
        check_wait_timeout(self.wait_timeout)
        check_retention(self.retention)


def check_wait_timeout(seconds: float) -> float:
    """Return ``seconds`` if it is a usable wait timeout, else raise `ValueError`."""
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"wait_timeout must be a positive number of seconds, not {seconds!r}")
    return float(seconds)


def check_retention(retention: timedelta) -> timedelta:
    """Return ``retention`` if it is a usable retention, else raise `ValueError`."""
    if not isinstance(retention, timedelta) or retention < timedelta(0):
        raise ValueError(f"retention must be a non-negative timedelta, not {retention!r}")
    return retention
