"""What a barrier hands down to the work it starts: sessions, storage, its own transactions, the outcome sinks.

`Barrier` builds one `Runtime` and gives it to every `UnitOfWork`, `Lease`, relay and consumer it serves.
They call down into it, never back into the barrier: the barrier is a façade over this and the options.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Generic

from typing_extensions import TypeVar

from ._codec import JSON
from ._errors import checkout, connection_lost, translating
from ._memory import Memory
from ._metrics import Outcome, outcome_of
from ._migrate import check_schema_on
from ._observe import decisions, log_decision, observe
from ._storage import Storage, TableName, check_connection, open_storage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

    from ._codec import Codec
    from ._config import Options
    from ._observe import Observation, Phases, Work
    from ._record import Record, Status

__all__ = ["Runtime"]

_log = logging.getLogger("idembarrier")

R = TypeVar("R", default=JSON)
T = TypeVar("T")


class Runtime(Generic[R]):
    """The collaborators of one barrier's work, built once by the barrier.

    Args:
        sessionmaker: Opens the sessions of idembarrier's own transactions and of owned units of work.
        codec: Encodes and decodes responses.
        options: The barrier's resolved settings.
        on_reclaim: Called with the record each time a stale lease is reclaimed (or turned UNKNOWN).
    """

    __slots__ = (
        "_connection_checked",
        "_observers",
        "_on_reclaim",
        "_outcomes",
        "_schema_checked",
        "_watchers",
        "codec",
        "memory",
        "options",
        "sessionmaker",
        "table",
    )

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        codec: Codec[R],
        options: Options,
        on_reclaim: Callable[[Record], object] | None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.codec = codec
        self.options = options
        self.table = TableName(options.table, options.schema)
        self._on_reclaim = on_reclaim
        self._schema_checked = not options.check_schema
        self._connection_checked = False
        self._outcomes: Counter[Outcome] = Counter()
        self._observers: list[Callable[[Outcome, str], object]] = []
        self._watchers: list[Callable[[Observation], object]] = []
        self.memory = Memory()  # of keys that finished here, and of finished records read here (`_memory`)

    # -- keys that finished in this process ----------------------------------------------------------------

    def finished(self, scope: str, key: str, *, executed: bool) -> None:
        """Note that ``key`` finished here: a retry of it is likely a replay (`finished_here`).

        An execution makes whatever record of the key was remembered a thing of the past.
        """
        self.memory.note(scope, key)
        if executed:
            self.memory.forget(scope, key)

    def finished_here(self, scope: str, key: str) -> bool:
        """Whether ``key`` finished in this process lately: its next unit of work reads before it claims.

        Only a hint for the order of two statements, never a decision: the lookup replays only what the
        database says is finished, and anything else goes on to the claim.
        """
        return self.memory.seen(scope, key)

    # -- storage ----------------------------------------------------------------------------------------

    async def storage_on(self, conn: AsyncConnection, *, check: bool = True) -> Storage:
        """Return the records table's storage on ``conn``, checking the schema on first use.

        ``check=False`` defers the check to `check_schema`, for callers that must first open a savepoint.
        """
        if check:
            await self.check_schema(conn)
        return await open_storage(conn, self.table)

    async def check_schema(self, conn: AsyncConnection) -> None:
        """Raise `SchemaError` unless the schema is at head; reads the version table once per barrier.

        The first time, the connection is checked too (`check_connection`): behind a transaction pooler, an
        engine that keeps prepared statements across transactions is refused with a `ConfigurationError`.
        """
        if not self._schema_checked:
            await check_schema_on(conn, schema=self.table.schema)
            self._schema_checked = True
        if not self._connection_checked:
            with translating("checking the database connection"):
                await check_connection(conn)
            self._connection_checked = True

    @asynccontextmanager
    async def transaction(self, doing: str, *, wait: float | None = None) -> AsyncIterator[Storage]:
        """A transaction of idembarrier's own, committed when the block exits cleanly; yields its storage.

        With ``wait``, the transaction is opened first, waiting at most that long for a database-wide lock
        (SQLite's write lock); without, the first statement opens it (or runs on its own). A database error,
        in the block or at the commit, becomes our `StorageError` (or one of its kinds) naming ``doing``. A
        pooled connection found dead before anything was sent is replaced; one that dies is discarded,
        never pooled again.
        """
        with translating(doing):
            async with self.sessionmaker() as session:
                try:
                    conn = await checkout(session, doing, replace=True)  # a session of ours: nothing sent yet
                    storage = await self.storage_on(conn)
                    if wait is not None:
                        await storage.begin(wait)
                    yield storage
                    await session.commit()
                except BaseException as exc:
                    if connection_lost(exc):
                        # Our statements bypass SQLAlchemy, which then cannot see that the connection died.
                        await session.invalidate()
                    raise

    async def atomically(self, operation: Callable[[Storage], Awaitable[T]], *, wait: float | None = None) -> T:
        """Run one storage operation in a transaction of its own (see `transaction`) and commit it."""
        async with self.transaction("reading or writing the records table", wait=wait) as storage:
            return await operation(storage)

    # -- outcomes ---------------------------------------------------------------------------------------

    @property
    def outcomes(self) -> Counter[Outcome]:
        """A copy of the outcomes counted so far."""
        return Counter(self._outcomes)

    def observe(self, observer: Callable[[Outcome, str], object]) -> None:
        """Call ``observer(outcome, scope)`` for every outcome counted from now on."""
        self._observers.append(observer)

    def count(self, outcome: Outcome | BaseException, scope: str) -> None:
        """Count a call's outcome, given as such or as the exception its claim raised."""
        if isinstance(outcome, BaseException):
            if (counted := outcome_of(outcome)) is None:
                return
            outcome = counted
        self._outcomes[outcome] += 1
        for observer in self._observers:
            observer(outcome, scope)

    def watch(self, watcher: Callable[[Observation], object]) -> None:
        """Call ``watcher(observation)`` as each unit of work or lease ends, from now on.

        Watchers run inline, after the call's commit or rollback; an exception from one is logged on the
        ``idembarrier`` logger and goes no further (the call's own outcome stands).
        """
        self._watchers.append(watcher)

    def report(
        self,
        work: Work,
        phases: Phases,
        *,
        scope: str,
        key: str,
        outcome: Outcome | None,
        attempt: int,
        status: Status | None = None,
        error: BaseException | None = None,
        reclaimed: bool = False,
    ) -> None:
        """Tell the decision log and the watchers how a call ended; nothing is built if nobody looks."""
        if not self._watchers and not decisions.isEnabledFor(logging.INFO):
            return
        observation = observe(
            work,
            phases,
            scope=scope,
            key=key,
            outcome=outcome,
            attempt=attempt,
            status=status,
            error=error,
            reclaimed=reclaimed,
        )
        log_decision(observation)
        for watcher in self._watchers:
            try:
                watcher(observation)
            except Exception:
                _log.exception("idembarrier: a watcher failed on a %s in scope %r", work.value, scope)

    def reclaimed(self, record: Record) -> None:
        """Count a reclaimed (or UNKNOWN-turned) lease and report it to the ``on_reclaim`` hook."""
        self.count(Outcome.STALE_RECLAIM, record.scope)
        if self._on_reclaim is not None:
            self._on_reclaim(record)
