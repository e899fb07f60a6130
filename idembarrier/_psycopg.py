"""PostgreSQL through psycopg 3: the same statements as through asyncpg, sent the way psycopg sends them.

`idembarrier._postgres` holds every PostgreSQL statement, each with its concurrency condition, and the
storage that runs them. This module runs that same storage over psycopg: a psycopg raw cursor takes the
statements' own ``$1`` placeholders unchanged (``AsyncRawCursor``, psycopg 3.2+), so both drivers send one
text. As with asyncpg, the statements go straight to the psycopg connection under SQLAlchemy's, in the unit
of work's transaction, which SQLAlchemy still commits and rolls back.

A bounded wait is the asyncpg driver's ``timeout``: the statement is cancelled on the server once it runs
out (psycopg sends the cancel request when its task is cancelled) and `TimeoutError` is raised. The relay
LISTENs through psycopg's ``notifies()`` on a connection of its own (see `idembarrier._listen`).

The caller's cancellation is another matter. psycopg answers a task cancelled during a query by first
cancelling the query on the server (``AsyncConnection.wait``: a cancel request of up to 5 s, then up to 5 s
for the query to end), and only a second cancellation cuts that short. anyio's deadlines cancel again until
they are heard; ``asyncio.timeout`` cancels once, so on a silent connection its caller would get control back
5 to 10 s late. A connection that serves a unit of work therefore answers its task's cancellation at once
(`_PromptCancellation`): psycopg closes it and lets the cancellation go on, exactly what it does under anyio.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from psycopg import AsyncRawCursor
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from ._exceptions import UnitOfWorkError
from ._listen import listen
from ._poolers import check_psycopg
from ._postgres import PostgresStorage
from ._storage import Dialect

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable, Sequence

    from psycopg import AsyncConnection as PsycopgConnection
    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._storage import Names

__all__ = ["DIALECT", "PsycopgStorage"]


class _PromptCancellation:
    """A psycopg connection's ``cancel_safe``, which gives its task's pending cancellation back at once.

    psycopg calls ``cancel_safe`` when the task running a query is cancelled, to cancel the query on the
    server before the `CancelledError` goes on. Raised from here, the `CancelledError` makes psycopg close the
    connection instead (its answer to a second cancellation), so the caller's deadline is kept. Only the
    barrier's own wait bound (`bounded`), expired with no other cancellation pending, still goes to the server:
    the connection then stays usable, in a failed transaction the unit of work rolls back. A call outside a
    cancellation (the application's own ``cancel_safe()``) is psycopg's.
    """

    def __init__(self, driver: PsycopgConnection[Any]) -> None:
        self._cancel_safe = driver.cancel_safe  # psycopg's own, bound before this one replaces it
        self._bound: asyncio.Timeout | None = None  # the barrier's wait bound, while a statement runs under it
        self._cancelling = 0  # the task's pending cancellations when that bound was armed

    @classmethod
    def of(cls, driver: PsycopgConnection[Any]) -> _PromptCancellation:
        """The connection's `_PromptCancellation`, made its ``cancel_safe`` the first time."""
        installed = vars(driver).get("cancel_safe")
        if isinstance(installed, cls):
            return installed
        prompt = cls(driver)
        driver.cancel_safe = prompt  # type: ignore[method-assign]  # an instance attribute, for this connection
        return prompt

    @asynccontextmanager
    async def bounded(self, seconds: float) -> AsyncIterator[None]:
        """Run the block under the barrier's own wait bound of ``seconds``, raising `TimeoutError` past it."""
        task = asyncio.current_task()
        async with asyncio.timeout(seconds) as self._bound:
            self._cancelling = task.cancelling() if task is not None else 0
            try:
                yield
            finally:
                self._bound = None

    async def __call__(self, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - psycopg's own signature
        task = asyncio.current_task()
        pending = task.cancelling() if task is not None else 0
        # Our bound alone: it expired, and no cancellation came from outside it (each adds one to `pending`).
        ours = self._bound is not None and self._bound.expired() and pending <= self._cancelling + 1
        if pending and not ours:
            raise asyncio.CancelledError  # psycopg closes the connection and re-raises the caller's cancellation
        await self._cancel_safe(timeout=timeout)


class _Calls:
    """asyncpg's calling convention (``fetchrow(sql, *args, timeout=)``, …) over a psycopg connection.

    Rows come back as dicts, read by column name like asyncpg's records.
    """

    def __init__(self, driver: PsycopgConnection[Any]) -> None:
        self.driver = driver
        self._cancellation = _PromptCancellation.of(driver)

    async def _run(self, sql: str, args: Sequence[object], bound: float | None) -> AsyncRawCursor[dict[str, Any]]:
        cursor = AsyncRawCursor(self.driver, row_factory=dict_row)
        if bound is None:
            await cursor.execute(sql, args)
        else:
            # asyncio's own timeout, not an anyio scope: it cancels once, so psycopg's handler can await the
            # server's answer to its cancel request and leave the connection usable (in a failed transaction).
            async with self._cancellation.bounded(bound):
                await cursor.execute(sql, args)
        return cursor

    # ASYNC109: `timeout=` is asyncpg's keyword, which PostgresStorage passes; the bound is applied in `_run`.
    async def fetchrow(self, sql: str, *args: object, timeout: float | None = None) -> dict[str, Any] | None:  # noqa: ASYNC109
        return await (await self._run(sql, args, timeout)).fetchone()

    async def fetchval(self, sql: str, *args: object, timeout: float | None = None) -> object:  # noqa: ASYNC109
        row = await self.fetchrow(sql, *args, timeout=timeout)
        return None if row is None else next(iter(row.values()))

    async def fetch(self, sql: str, *args: object) -> list[dict[str, Any]]:
        return await (await self._run(sql, args, None)).fetchall()

    async def execute(self, sql: str, *args: object) -> None:
        await self._run(sql, args, None)

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await AsyncRawCursor(self.driver).executemany(sql, rows)

    def is_in_transaction(self) -> bool:
        return self.driver.info.transaction_status != TransactionStatus.IDLE


class PsycopgStorage(PostgresStorage):
    """`Storage` for postgresql+psycopg: `PostgresStorage`'s statements and methods, over psycopg."""

    def __init__(self, conn: AsyncConnection, adapted: Any, names: Names) -> None:
        """Bind to ``conn`` and the psycopg connection under SQLAlchemy's adapter ``adapted``."""
        super().__init__(conn, adapted, names)
        self._driver = _Calls(adapted.driver_connection)  # asyncpg's calling convention, for psycopg

    async def begin(self, wait: float | None) -> None:
        """Make sure the claim runs in a transaction: psycopg opens it at its first statement, as SQLAlchemy would.

        psycopg sends BEGIN (with the isolation level SQLAlchemy set on it) before the first statement of a
        connection that is not in autocommit mode, so nothing needs sending here.
        """
        if self._adapted.driver_connection.autocommit:
            raise UnitOfWorkError(
                "the barrier needs a transaction, but this connection is in AUTOCOMMIT mode: "
                "use an engine or session without isolation_level='AUTOCOMMIT'"
            )


DIALECT = Dialect(open=PsycopgStorage.open, listen=listen, check=check_psycopg)
"""PostgreSQL's entry for psycopg in `idembarrier._storage.DIALECTS`."""
