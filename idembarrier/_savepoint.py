"""The savepoint a unit of work opens in a caller's session: SQLAlchemy's bookkeeping over the driver's statements.

With the caller's session (``unit_of_work(key, session=...)``) the claim, the body's writes and the outcome
run inside a savepoint, so that a conflict or a failing body undoes exactly them and leaves the caller's
transaction usable. ``session.begin_nested()`` does that, in two layers:

- the ORM's nested `SessionTransaction`, which takes the session's snapshot: on a rollback it expunges
  what the body added, restores what it deleted and expires what it changed (and on a release hands them
  to the caller's transaction), firing the session's events;
- the connection's savepoint under it, whose SAVEPOINT, RELEASE and ROLLBACK TO Core sends through its full
  statement execution: about 150 µs of client CPU each on asyncpg, most of what the caller-session path
  cost beyond the own-session one (see benchmarks/).

`open_savepoint` keeps the first layer as it is and replaces the second: the ORM asks the connection for its
savepoint (``Connection.begin_nested()``) and is handed a `DriverSavepoint`, which sends the three statements
on the DBAPI connection under SQLAlchemy's, as the claim and the completion go. Should a SQLAlchemy release
stop asking the connection that way, the savepoint stays Core's own: slower, never wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import translate

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["NAME", "DriverSavepoint", "Savepoint", "open_savepoint"]

NAME = "idembarrier_unit_of_work"
"""The savepoint's name. Savepoints of one name nest: RELEASE and ROLLBACK TO act on the latest one, so a unit
of work inside another's body (one caller's session) ends its own."""


class DriverSavepoint:
    """The connection-level savepoint under the ORM's nested transaction, sent on the DBAPI connection.

    It stands where Core's ``NestedTransaction`` would: the session calls `commit` (RELEASE), `rollback`
    (ROLLBACK TO) and `close` (ROLLBACK TO, if still active) from inside its own greenlet, where the DBAPI
    connection's synchronous cursor can wait for the driver. Like Core's, it sends nothing once the
    connection's transaction is gone (ended from inside the body, or the connection invalidated).
    """

    __slots__ = ("_connection", "_dbapi", "is_active")

    def __init__(self, connection: Connection, dbapi: Any) -> None:
        self._connection = connection
        self._dbapi = dbapi  # SQLAlchemy's DBAPI adapter around the driver's connection
        self.is_active = False  # until its SAVEPOINT ran

    def begin(self) -> None:
        """Send the SAVEPOINT (in a greenlet); from here on, the session's rollback undoes what follows."""
        self._send(f"SAVEPOINT {NAME}", "opening the unit of work's savepoint")
        self.is_active = True

    def commit(self) -> None:
        """Release the savepoint: what ran in it is part of the caller's transaction now."""
        self._end(f"RELEASE SAVEPOINT {NAME}", "releasing the unit of work's savepoint")

    def rollback(self) -> None:
        """Undo everything since the SAVEPOINT; the caller's transaction goes on."""
        self._end(f"ROLLBACK TO SAVEPOINT {NAME}", "rolling back to the unit of work's savepoint")

    def close(self) -> None:
        """Roll back, if still active: what closing Core's savepoint does."""
        self.rollback()

    def _end(self, sql: str, doing: str) -> None:
        if not self.is_active:
            return
        self.is_active = False
        connection = self._connection
        if connection.closed or connection.invalidated or not connection.in_transaction():
            return  # the transaction, and the savepoint with it, is gone already
        self._send(sql, doing)

    def _send(self, sql: str, doing: str) -> None:
        cursor = self._dbapi.cursor()
        try:
            cursor.execute(sql)
        except Exception as exc:
            # Ours, classified like every statement of ours: never the driver's own exception.
            if (ours := translate(exc, doing)) is not None:
                raise ours from exc
            raise
        finally:
            cursor.close()


class Savepoint:
    """The unit of work's savepoint in a caller's session, ended once: `commit` releases it, `rollback` undoes it."""

    __slots__ = ("_session", "_transaction")

    def __init__(self, session: AsyncSession, transaction: SessionTransaction) -> None:
        self._session = session
        self._transaction = transaction  # the ORM's nested transaction

    async def commit(self) -> None:
        """Flush the body's pending writes and release the savepoint, as ``begin_nested()``'s commit does."""
        await self._session.run_sync(_commit, self._transaction)

    async def rollback(self) -> None:
        """Roll back to the savepoint, as ``begin_nested()``'s rollback does (the session's snapshot restored)."""
        await self._session.run_sync(_rollback, self._transaction)


async def open_savepoint(session: AsyncSession, conn: AsyncConnection) -> Savepoint:
    """Open the unit of work's savepoint on ``conn``, the caller's ``session``'s connection (one round trip).

    Raises:
        StorageError: The SAVEPOINT failed (the caller's transaction is as it was).
    """
    sync = conn.sync_connection
    if sync is None:  # pragma: no cover - a connection the session just handed out is open
        raise RuntimeError("the session's connection is closed")
    return Savepoint(session, await session.run_sync(_begin_nested, sync))


def _begin_nested(session: Session, connection: Connection) -> SessionTransaction:
    """``session.begin_nested()``, bound to ``connection`` at once, its savepoint a `DriverSavepoint`."""
    pooled = connection.connection  # the pool's connection: no I/O, the session holds it already
    savepoint = DriverSavepoint(connection, pooled.dbapi_connection)
    handed: list[DriverSavepoint] = []

    def begin_nested() -> DriverSavepoint:
        handed.append(savepoint)
        return savepoint

    nested = session.begin_nested()  # the ORM's snapshot (the caller's writes were flushed before)
    try:
        # The nested transaction asks the connection for its savepoint as it binds it: for this one call,
        # the connection hands out ours. An instance attribute shadows the method; deleting it restores it.
        setattr(connection, "begin_nested", begin_nested)  # noqa: B010 - mypy refuses assigning to a method
        try:
            bound = session.connection()
        finally:
            delattr(connection, "begin_nested")
        if bound is not connection:  # pragma: no cover - the session has one connection per bind
            raise RuntimeError("the session bound its savepoint to another connection")
        if handed:
            savepoint.begin()
        # Else this SQLAlchemy binds its savepoints some other way: Core sent its own SAVEPOINT, which the
        # nested transaction releases and rolls back itself.
    except BaseException:
        nested.rollback()
        raise
    return nested


def _commit(_session: Session, transaction: SessionTransaction) -> None:
    transaction.commit()


def _rollback(_session: Session, transaction: SessionTransaction) -> None:
    transaction.rollback()
