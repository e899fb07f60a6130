"""PostgreSQL through psycopg 3: the same statements as through asyncpg, sent the way psycopg sends them.

`idembarrier._postgres` holds every PostgreSQL statement, each with its concurrency condition, and the
storage that runs them. This module runs that same storage over psycopg: a psycopg raw cursor takes the
statements' own ``$1`` placeholders unchanged (``AsyncRawCursor``, psycopg 3.2+), so both drivers send one
text. As with asyncpg, the statements go straight to the psycopg connection under SQLAlchemy's, in the unit
of work's transaction, which SQLAlchemy still commits and rolls back.

A bounded wait is the asyncpg driver's ``timeout``: the statement is cancelled on the server once it runs
out (psycopg sends the cancel request when its task is cancelled) and `TimeoutError` is raised. The relay
LISTENs through psycopg's ``notifies()`` on a connection of its own (see `idembarrier._listen`).
"""

from __future__ import annotations

import asyncio
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
    from collections.abc import Iterable, Sequence

    from psycopg import AsyncConnection as PsycopgConnection
    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._storage import Names

__all__ = ["DIALECT", "PsycopgStorage"]


class _Calls:
    """asyncpg's calling convention (``fetchrow(sql, *args, timeout=)``, …) over a psycopg connection.

    Rows come back as dicts, read by column name like asyncpg's records.
    """

    def __init__(self, driver: PsycopgConnection[Any]) -> None:
        self.driver = driver

    async def _run(self, sql: str, args: Sequence[object], bound: float | None) -> AsyncRawCursor[dict[str, Any]]:
        cursor = AsyncRawCursor(self.driver, row_factory=dict_row)
        if bound is None:
            await cursor.execute(sql, args)
        else:
            # asyncio's own timeout, not an anyio scope: it cancels once, so psycopg's handler can await the
            # server's answer to its cancel request and leave the connection usable (in a failed transaction).
            async with asyncio.timeout(bound):
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
