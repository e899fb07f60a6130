"""Reconciliation: ask the provider about each key in doubt, by its downstream key, and settle what it says.

A key is in doubt when its leased work died after it may have called out: an UNKNOWN record (reclaimed
past ``max_reclaims``) and, on request, a stale lease. `reconcile` looks each one up with the `Provider`
(by `downstream_key`, the key the holder called out with) and decides, in this order:

=============================================  ==========================================================
the provider's answer                          what reconciliation does
=============================================  ==========================================================
an exception, a timeout, not a `ProviderAnswer`  escalate (a person looks)
``PENDING``                                    escalate: the outcome is not known yet (its amount is in doubt)
``SUCCEEDED``                                  resolve COMPLETED with ``response(record, answer)``
``FAILED``                                     resolve FAILED with ``response(record, answer)``
not found, key quiet for less than ``min_age``  escalate: a late call may still land
not found, then not found ``confirm_after``    resolve FAILED with ``response(record, None)``
later (or at once with ``confirm_after=None``)
=============================================  ==========================================================

A found answer is trusted at once: the operation happened (or was refused) under that key, and resolving
says so. A not-found answer is the dangerous one: the record is then FAILED, its client is told the
operation did not happen and may well try again with a new key, so a charge that did happen but is not yet
visible (an eventually consistent provider, a search index behind the ledger) or that is still on its way
(a holder stalled past its lease, whose call lands later) would be made twice. Hence two rules, both on by
default: the key must have been quiet (no lease running: since its last lease ended, or since it was
claimed for an UNKNOWN record, whose lease end is not kept) for ``min_age``, longer than a holder can run
past its lease plus the provider's visibility lag; and the provider must say "not found" twice,
``confirm_after`` apart.

Each resolution is its own transaction, conditioned on the record the lookup was made for: a stale lease
is locked by its token first (a reclaimer that took it over meanwhile, or a holder that renewed it, makes
the resolution a no-op, reported as skipped), and an UNKNOWN record must still be the same UNKNOWN record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import anyio

from ._codec import round_trip
from ._exceptions import ConfigurationError
from ._lease import downstream_key
from ._record import Record, Status

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._barrier import Barrier, Unresolved
    from ._codec import JSON
    from ._runtime import Runtime

__all__ = [
    "DEFAULT_CONFIRM_AFTER",
    "DEFAULT_MIN_AGE",
    "Provider",
    "ProviderAnswer",
    "ProviderStatus",
    "Reconciled",
    "Reconciliation",
    "Verdict",
    "reconcile",
]

R = TypeVar("R")

DEFAULT_MIN_AGE = timedelta(minutes=15)
"""How long a key must have been quiet before a not-found answer about it is trusted."""
DEFAULT_CONFIRM_AFTER = timedelta(seconds=30)
"""How long after a first not-found answer the provider is asked again."""


class ProviderStatus(StrEnum):
    """Where the provider says an operation stands."""

    SUCCEEDED = "SUCCEEDED"
    """It happened (a charge captured, an email accepted)."""
    FAILED = "FAILED"
    """The provider refused it for good (a card declined): it will never happen under this key."""
    PENDING = "PENDING"
    """The provider has it but has not finished it; its outcome is not known yet."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderAnswer:
    """What the provider knows of an operation it found by its downstream key.

    Attributes:
        status: Where the operation stands.
        amount: Its amount in the provider's minor units (cents), if it has one.
        reference: The provider's own id for it (a charge id), if any.
    """

    status: ProviderStatus
    amount: int | None = None
    reference: str | None = None


class Provider(Protocol):
    """The other side of leased work, asked about an operation by the downstream key it was made with."""

    async def lookup(self, downstream_key: str) -> ProviderAnswer | None:
        """Return what the provider knows of the operation made with ``downstream_key``; ``None``: not found.

        Raise when the provider cannot answer: the key is then escalated, never resolved.
        """
        ...


class Verdict(StrEnum):
    """What reconciliation did (or, in a dry run, would do) with a key in doubt."""

    COMPLETED = "COMPLETED"
    """Resolved COMPLETED: the provider says the operation succeeded."""
    FAILED = "FAILED"
    """Resolved FAILED: the provider refused it, or twice did not find it."""
    ESCALATED = "ESCALATED"
    """Left for a person: the provider could not say, or not safely enough."""
    SKIPPED = "SKIPPED"
    """Left alone: the record changed while the provider was asked (reclaimed, renewed, resolved)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconciled:
    """One key in doubt and what reconciliation did with it.

    Attributes:
        record: The record as it was listed.
        downstream_key: The key the provider was asked about.
        verdict: What was done (or would be, in a dry run).
        reason: Why, in words.
        answer: The provider's last answer (``None``: not found, or no answer).
        amount: The answer's amount, else what ``amount_of`` says of the record (``None``: unknown).
    """

    record: Record
    downstream_key: str
    verdict: Verdict
    reason: str
    answer: ProviderAnswer | None
    amount: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconciliation:
    """The report of one `reconcile` run.

    Attributes:
        keys: Every key looked at, oldest first.
        dry_run: Whether nothing was written (verdicts are what would have been done).
        stale_leases_left: Stale leases listed but not looked at (``include_stale`` was false).
        limit_reached: The listing was cut at ``limit``: there may be more keys in doubt.
    """

    keys: tuple[Reconciled, ...]
    dry_run: bool
    stale_leases_left: int
    limit_reached: bool

    def count(self, verdict: Verdict) -> int:
        """How many keys got ``verdict``."""
        return sum(1 for k in self.keys if k.verdict is verdict)

    def amount(self, verdict: Verdict) -> int:
        """The sum of the known amounts of the keys that got ``verdict``."""
        return sum(k.amount for k in self.keys if k.verdict is verdict and k.amount is not None)

    @property
    def resolved(self) -> int:
        """Keys resolved COMPLETED or FAILED."""
        return self.count(Verdict.COMPLETED) + self.count(Verdict.FAILED)

    @property
    def escalated(self) -> int:
        """Keys left for a person."""
        return self.count(Verdict.ESCALATED)

    @property
    def in_doubt_amount(self) -> int:
        """The amount still in doubt: the known amounts of the escalated keys."""
        return self.amount(Verdict.ESCALATED)

    @property
    def in_doubt_unknown(self) -> int:
        """Escalated keys whose amount nobody knows (not in ``in_doubt_amount``)."""
        return sum(1 for k in self.keys if k.verdict is Verdict.ESCALATED and k.amount is None)

    @property
    def ok(self) -> bool:
        """Whether nothing is left in doubt: no key escalated and the listing was complete."""
        return self.escalated == 0 and not self.limit_reached


def default_response(record: Record, answer: ProviderAnswer | None) -> JSON:
    """The response recorded when no ``response`` hook is given (JSON codecs only): what the provider said."""
    return {
        "reconciled": True,
        "downstream_key": downstream_key(record.scope, record.key),
        "provider_status": "NOT_FOUND" if answer is None else answer.status.value,
        "amount": None if answer is None else answer.amount,
        "reference": None if answer is None else answer.reference,
    }


_Looked = ProviderAnswer | None | str
"""A lookup's outcome: the answer, not found, or why there is no answer (the provider failed)."""


async def reconcile(
    barrier: Barrier[R],
    provider: Provider,
    *,
    min_age: timedelta = DEFAULT_MIN_AGE,
    confirm_after: timedelta | None = DEFAULT_CONFIRM_AFTER,
    include_stale: bool = False,
    response: Callable[[Record, ProviderAnswer | None], R] | None = None,
    amount_of: Callable[[Record], int | None] | None = None,
    limit: int = 1000,
    concurrency: int = 8,
    lookup_timeout: float = 10.0,
    dry_run: bool = False,
) -> Reconciliation:
    """Look up every key in doubt with ``provider``, resolve what it answers safely, escalate the rest.

    Args:
        barrier: The barrier whose records are reconciled.
        provider: Asked about each key by its downstream key.
        min_age: A not-found answer is trusted only for a key quiet this long (database clock).
        confirm_after: Ask again this long after a first not-found answer, and trust only a second one
            (``None``: trust the first; for a provider that is strongly consistent).
        include_stale: Reconcile stale leases too, not only UNKNOWN records. A stale lease is usually
            better left to its client's retry, which reclaims it and finishes it with its business writes.
        response: Builds the response recorded for a resolved key from the record and the answer
            (``None`` for not found); required unless the barrier's codec takes JSON values.
        amount_of: The amount of a key the provider gave none for (from its checkpoint, say), for the
            amount still in doubt.
        limit: Most keys listed (oldest first); the report says when the listing was cut.
        concurrency: Most lookups at once.
        lookup_timeout: Longest wait for one lookup, in seconds; past it the key is escalated.
        dry_run: Ask the provider but write nothing; the verdicts say what would be done.

    Raises:
        ConfigurationError: An option is unusable.
    """
    if min_age < timedelta(0) or (confirm_after is not None and confirm_after < timedelta(0)):
        raise ConfigurationError("min_age and confirm_after must not be negative")
    if limit < 1 or concurrency < 1:
        raise ConfigurationError(f"limit and concurrency must be at least 1, not {limit!r} and {concurrency!r}")
    if not (isinstance(lookup_timeout, int | float) and math.isfinite(lookup_timeout) and lookup_timeout > 0):
        raise ConfigurationError(f"lookup_timeout must be a positive number of seconds, not {lookup_timeout!r}")
    build = response if response is not None else cast("Callable[[Record, ProviderAnswer | None], R]", default_response)
    listed = await barrier.unresolved(limit=limit)
    doubtful = [u for u in listed if include_stale or u.record.status is Status.UNKNOWN]
    ask = _Asker(provider, concurrency, lookup_timeout)
    first = await ask.all([u.record for u in doubtful])
    unconfirmed = [i for i, u in enumerate(doubtful) if first[i] is None and _quiet(u) >= min_age]
    looked = list(first)
    if confirm_after is not None and unconfirmed:
        await anyio.sleep(confirm_after.total_seconds())
        for i, again in zip(unconfirmed, await ask.all([doubtful[i].record for i in unconfirmed]), strict=True):
            looked[i] = again
    keys = []
    for i, u in enumerate(doubtful):
        verdict, reason = _decide(u, first[i], looked[i], min_age=min_age, confirmed=confirm_after is not None)
        last = looked[i]
        answer = last if isinstance(last, ProviderAnswer) else None
        if verdict is not Verdict.ESCALATED:
            verdict, reason = await _settle(barrier.runtime, u.record, verdict, reason, build, answer, dry_run)
        amount = None if answer is None else answer.amount
        if amount is None and amount_of is not None:
            amount = amount_of(u.record)
        keys.append(
            Reconciled(
                record=u.record,
                downstream_key=downstream_key(u.record.scope, u.record.key),
                verdict=verdict,
                reason=reason,
                answer=answer,
                amount=amount,
            )
        )
    return Reconciliation(
        keys=tuple(keys),
        dry_run=dry_run,
        stale_leases_left=len(listed) - len(doubtful),
        limit_reached=len(listed) == limit,
    )


def _quiet(unresolved: Unresolved) -> timedelta:
    """How long the key has had no lease running: since its lease ended, or (UNKNOWN) since it was claimed."""
    record = unresolved.record
    if record.locked_until is None or record.created_at is None:
        return unresolved.age
    return unresolved.age - (record.locked_until - record.created_at)


def _decide(
    unresolved: Unresolved, first: _Looked, last: _Looked, *, min_age: timedelta, confirmed: bool
) -> tuple[Verdict, str]:
    """The verdict the provider's answers give (the table in the module's docstring)."""
    if isinstance(last, str):
        return Verdict.ESCALATED, last
    if last is not None:
        if last.status is ProviderStatus.SUCCEEDED:
            return Verdict.COMPLETED, "the provider says it succeeded"
        if last.status is ProviderStatus.FAILED:
            return Verdict.FAILED, "the provider says it failed"
        return Verdict.ESCALATED, "the provider has it, still pending"
    quiet = _quiet(unresolved)
    if quiet < min_age:
        return Verdict.ESCALATED, f"not found, but quiet for only {_seconds(quiet)} (min_age {_seconds(min_age)})"
    if first is None and confirmed:
        return Verdict.FAILED, "not found, twice"
    return Verdict.FAILED, "not found"


def _seconds(interval: timedelta) -> str:
    return f"{max(0.0, interval.total_seconds()):.0f}s"


class _Asker:
    """Lookups, at most ``concurrency`` at once, each within ``timeout``; a failure becomes its reason."""

    def __init__(self, provider: Provider, concurrency: int, timeout: float) -> None:
        self._provider = provider
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._timeout = timeout

    async def all(self, records: list[Record]) -> list[_Looked]:
        looked: list[_Looked] = ["not asked"] * len(records)

        async def one(i: int, record: Record) -> None:
            async with self._limiter:
                looked[i] = await self._one(downstream_key(record.scope, record.key))

        async with anyio.create_task_group() as group:
            for i, record in enumerate(records):
                group.start_soon(one, i, record)
        return looked

    async def _one(self, key: str) -> _Looked:
        try:
            with anyio.fail_after(self._timeout):
                answer: object = await self._provider.lookup(key)
        except TimeoutError:
            return f"the provider did not answer within {self._timeout:g}s"
        except Exception as exc:  # whatever the provider raises, the key stays in doubt
            return f"the provider failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
        if answer is None or isinstance(answer, ProviderAnswer):
            return answer
        return f"the provider answered {type(answer).__name__}, not a ProviderAnswer or None"


async def _settle(
    runtime: Runtime[R],
    record: Record,
    verdict: Verdict,
    reason: str,
    build: Callable[[Record, ProviderAnswer | None], R],
    answer: ProviderAnswer | None,
    dry_run: bool,
) -> tuple[Verdict, str]:
    """Resolve ``record`` as ``verdict`` unless it changed since it was listed; return what was done."""
    try:
        encoded, _ = round_trip(runtime.codec, build(record, answer))
    except Exception as exc:  # a hook's or codec's failure keeps this key in doubt, not the others
        return Verdict.ESCALATED, f"{reason}, but its response could not be built: {type(exc).__name__}: {exc}"
    if dry_run:
        return verdict, reason
    status = Status.COMPLETED if verdict is Verdict.COMPLETED else Status.FAILED
    keep = runtime.options.retention_for(record.scope)
    scope, key = record.scope, record.key
    async with runtime.transaction("resolving a key in doubt", wait=runtime.options.wait_timeout) as storage:
        if record.status is Status.IN_PROGRESS:
            # Locks the row if the lease is still the one the provider was asked about: a reclaimer (which
            # skips locked rows) cannot take it over between this check and the resolution.
            if not await storage.fence(scope, key, record.token):
                return Verdict.SKIPPED, "reclaimed or resolved while the provider was asked"
        else:
            # An UNKNOWN record's token never changes: only a resolution ends it (then resolve matches nothing).
            current = await storage.inspect(scope, key)
            if current is None or current.token != record.token or current.status is not Status.UNKNOWN:
                return Verdict.SKIPPED, "resolved by someone else while the provider was asked"
        if not await storage.resolve(scope, key, status, encoded, keep):
            return Verdict.SKIPPED, "changed while the provider was asked (its lease renewed, or resolved)"
    return verdict, reason
