"""The one place where driver errors become idembarrier's: classified by SQLSTATE, never by message text.

MariaDB's drivers (asyncmy, aiomysql) report the server's error code, not its SQLSTATE: those errors are
classified by code, and carry ``"mysql:<code>"`` where a SQLSTATE would be (`sqlstate_of`).
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError, InvalidRequestError
from sqlalchemy.exc import TimeoutError as _PoolTimeout

from ._exceptions import (
    ConnectError,
    ConnectionLostError,
    IdembarrierError,
    PoolTimeoutError,
    SerializationError,
    StorageError,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = [
    "POOLER_SQLSTATES",
    "checkout",
    "closed_while_idle",
    "connect_error",
    "connection_lost",
    "lock_not_available",
    "mysql_code",
    "sqlstate_of",
    "transient",
    "translate",
    "translating",
]

_LOCK_NOT_AVAILABLE = "55P03"  # a lock wait that ran out of lock_timeout

POOLER_SQLSTATES = frozenset({"26000", "42P05"})
"""invalid_sql_statement_name, duplicate_prepared_statement: a prepared statement missing from (or taken in)
this server session, which is what a transaction pooler does to session-bound statements (`_poolers`)."""

_SERIALIZATION = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
# Class 08 is connection_exception; 57P01-57P03 are admin_shutdown (pg_terminate_backend), crash_shutdown
# and cannot_connect_now.
_CONNECTION_LOST_PREFIX = "08"
_CONNECTION_LOST = frozenset({"57P01", "57P02", "57P03"})
# SQLite primary result codes (the low byte of the extended code).
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6

try:  # asyncpg is the PostgreSQL driver; it is optional, and only its raw exceptions need naming here.
    from asyncpg.exceptions import InterfaceError as _AsyncpgInterfaceError
    from asyncpg.exceptions import InternalClientError as _AsyncpgClientError
    from asyncpg.exceptions import PostgresError as _AsyncpgPostgresError
except ImportError:  # pragma: no cover - asyncpg is installed wherever PostgreSQL is used
    _AsyncpgInterfaceError = _AsyncpgClientError = _AsyncpgPostgresError = ()

try:  # psycopg 3 is the other PostgreSQL driver, optional too.
    from psycopg import Error as _PsycopgError
    from psycopg import OperationalError as _PsycopgOperationalError
except ImportError:  # pragma: no cover - psycopg is installed in the tests' environment
    _PsycopgError = _PsycopgOperationalError = ()  # type: ignore[assignment,misc]

# asyncpg's InternalClientError is its protocol in a state it cannot leave: typically a pooled connection
# whose backend was terminated while idle, so that the server's FATAL message was read but not yet its EOF
# ("cannot switch to state 15; another operation (2) is in progress"). The connection is unusable: lost.
_BROKEN = (_AsyncpgInterfaceError, _AsyncpgClientError)

try:  # MariaDB's drivers, optional: asyncmy's errors, and PyMySQL's, which aiomysql raises.
    from asyncmy.errors import InterfaceError as _AsyncmyInterfaceError
    from asyncmy.errors import MySQLError as _AsyncmyError
except ImportError:  # pragma: no cover - asyncmy is installed in the tests' environment
    _AsyncmyError = _AsyncmyInterfaceError = ()  # type: ignore[assignment,misc]
try:
    from pymysql.err import InterfaceError as _PymysqlInterfaceError  # type: ignore[import-untyped]
    from pymysql.err import MySQLError as _PymysqlError
except ImportError:  # pragma: no cover - aiomysql (and PyMySQL) are installed in the tests' environment
    _PymysqlError = _PymysqlInterfaceError = ()
_MYSQL = (_AsyncmyError, _PymysqlError)
# An InterfaceError is the driver's own: its connection is closed or its protocol out of step. Lost.
_MYSQL_BROKEN = (_AsyncmyInterfaceError, _PymysqlInterfaceError)
# MariaDB error codes. A lock wait ran out: innodb_lock_wait_timeout (1205), max_statement_time (1969), or
# MySQL's NOWAIT (3572).
_MYSQL_LOCK_WAIT = frozenset({1205, 1969, 3572})
# Deadlock found (1213, SQLSTATE 40001; also Galera's certification failure at COMMIT); MySQL's
# ER_LOCK_ABORTED (1689) and Galera's "WSREP has not yet prepared node for application use" (1047) are not it.
_MYSQL_SERIALIZATION = frozenset({1213})
# The connection died: server gone away (2006), lost during a query (2013), lost, server side (2055),
# killed (1927, KILL CONNECTION), server shutting down (1053), idle past wait_timeout (4031).
_MYSQL_CONNECTION_LOST = frozenset({2006, 2013, 2055, 1927, 1053, 4031})
# What a retry can outlive besides those: too many connections (1040), can't connect (2003), out of memory
# in the server (1037, 1041), a lock table full (1206).
_MYSQL_TRANSIENT = _MYSQL_LOCK_WAIT | _MYSQL_SERIALIZATION | _MYSQL_CONNECTION_LOST | {1040, 2003, 1037, 1041, 1206}


def _broken(driver: BaseException | None) -> bool:
    """Whether the driver's error says its connection is unusable, whatever the server said (or did not).

    asyncpg: one of `_BROKEN`. psycopg: an ``OperationalError`` the server did not send (no SQLSTATE): the
    socket closed under a statement, or the connection already closed; the server's own errors of that
    class (a lock timeout, a cancel) carry their SQLSTATE and are classified by it.
    """
    if isinstance(driver, (*_BROKEN, *_MYSQL_BROKEN)):
        return True
    return isinstance(driver, _PsycopgOperationalError) and getattr(driver, "sqlstate", None) is None


def _driver_error(exc: BaseException) -> BaseException | None:
    """The driver's own exception behind ``exc``: itself, SQLAlchemy's ``orig``, or the adapter's cause.

    SQLAlchemy wraps driver errors (``DBAPIError.orig``); its asyncpg adapter, called directly, raises its
    own error classes with asyncpg's as ``__cause__``, and wrapped by SQLAlchemy (a failed connect) that
    cause sits under ``orig``. Anything else is not a database error.
    """
    orig = getattr(exc, "orig", None)
    for candidate in (exc, orig, exc.__cause__, getattr(orig, "__cause__", None)):
        if isinstance(candidate, (*_BROKEN, _AsyncpgPostgresError, _PsycopgError, sqlite3.Error, *_MYSQL)):
            return candidate
    return exc if isinstance(exc, DBAPIError) else None


def mysql_code(exc: BaseException) -> int | None:
    """The MariaDB/MySQL error code of a driver error (``exc`` itself, or what it wraps), if it is one."""
    driver = _driver_error(exc)
    if isinstance(driver, _MYSQL) and driver.args and isinstance(driver.args[0], int):
        return driver.args[0]
    return None


def sqlstate_of(exc: BaseException) -> str | None:
    """Return the SQLSTATE (PostgreSQL), ``"sqlite:<code>"`` or ``"mysql:<code>"`` of a driver error, if any."""
    if isinstance(exc, StorageError):
        return exc.sqlstate
    if (mysql := mysql_code(exc)) is not None and mysql != 0:  # 0: a driver error the server did not send
        return f"mysql:{mysql}"  # asyncmy's errors carry a SQLSTATE too, but HY000 says nothing: the code does
    driver = _driver_error(exc)
    state = getattr(driver, "sqlstate", None)
    if isinstance(state, str):
        return state
    code = getattr(driver, "sqlite_errorcode", None)
    if isinstance(code, int):
        return f"sqlite:{code}"
    return None


def _mysql_state(state: str | None) -> int | None:
    """The MariaDB error code in a ``"mysql:<code>"`` state, else ``None``."""
    return int(state[6:]) if state is not None and state.startswith("mysql:") else None


def lock_not_available(exc: BaseException) -> bool:
    """Whether ``exc`` says a bounded wait for a lock ran out.

    That is PostgreSQL's 55P03 (lock_timeout), SQLite's BUSY/LOCKED (busy timeout), MariaDB's 1205
    (innodb_lock_wait_timeout) or 1969 (max_statement_time), or the driver's own statement timeout. During a
    claim it means a concurrent holder kept the key (PostgreSQL, MariaDB) or the
    database's write lock (SQLite) for longer than the unit of work may wait.
    """
    if isinstance(exc, TimeoutError):
        return True
    state = sqlstate_of(exc)
    if state is None:
        return False
    if state.startswith("sqlite:"):
        return int(state[7:]) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    if (code := _mysql_state(state)) is not None:
        return code in _MYSQL_LOCK_WAIT
    return state == _LOCK_NOT_AVAILABLE


def translate(exc: BaseException, doing: str, *, ours: bool = True) -> StorageError | None:
    """Return our exception for a database error met while ``doing`` something, else ``None``.

    With ``ours`` (the failing statement was idembarrier's own), an OS-level connection error counts as a
    lost database connection too; for the body's exceptions only the drivers' own errors are translated,
    so a caller's ``ConnectionRefusedError`` from an HTTP call propagates unchanged. The caller raises the
    result ``from exc``.
    """
    driver = _driver_error(exc)
    if driver is None and not (ours and isinstance(exc, ConnectionError)):
        return None
    state = sqlstate_of(exc)
    invalidated = isinstance(exc, DBAPIError) and exc.connection_invalidated
    code = _mysql_state(state)
    if (state is not None and state in _SERIALIZATION) or code in _MYSQL_SERIALIZATION:
        return SerializationError(f"{doing}: the database aborted the transaction ({state})", sqlstate=state)
    if (
        invalidated
        or driver is None  # an OS-level connection error under our own statement
        or _broken(driver)
        or (state is not None and (state.startswith(_CONNECTION_LOST_PREFIX) or state in _CONNECTION_LOST))
        or code in _MYSQL_CONNECTION_LOST
    ):
        return ConnectionLostError(f"{doing}: the database connection was lost ({state or 'closed'})", sqlstate=state)
    if state is not None and state.startswith("sqlite:") and int(state[7:]) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StorageError(f"{doing}: the SQLite database stayed locked past its busy timeout", sqlstate=state)
    if state in POOLER_SQLSTATES:
        return StorageError(
            f"{doing}: the database failed ({state}): a prepared statement of another server session; is a "
            "transaction pooler in front? (see the guide's Engines page, 'Transaction poolers')",
            sqlstate=state,
        )
    return StorageError(f"{doing}: the database failed ({state or type(driver).__name__})", sqlstate=state)


@contextmanager
def translating(doing: str, *, ours: bool = True) -> Iterator[None]:
    """Raise our `StorageError` (or one of its kinds), from the driver's, for a database error in the block.

    The one way errors are translated at the seam: what ``doing`` says names the step in the message, and
    ``ours`` is `translate`'s. Our own exceptions, and whatever `translate` does not classify as the
    database's (the caller's own errors), propagate unchanged.
    """
    try:
        yield
    except IdembarrierError:
        raise
    except Exception as exc:
        if (error := translate(exc, doing, ours=ours)) is not None:
            raise error from exc
        raise


def connect_error(exc: BaseException, doing: str) -> StorageError | None:
    """Our exception for a failure to get a connection (from the pool, or a new one), else ``None``.

    SQLAlchemy's pool ``TimeoutError`` is a `PoolTimeoutError`; an operating-system error of the connect
    (refused, unreachable, the driver's connect timeout, which is the builtin ``TimeoutError``) is a
    `ConnectError` naming the OS's reason, read from its ``errno``. A server's refusal (a missing database, a
    failed authentication) keeps its SQLSTATE as a plain `StorageError`. Nothing ran in any of these cases.
    """
    if isinstance(exc, _PoolTimeout):
        return PoolTimeoutError(f"{doing}: no pooled connection became free within the pool's timeout")
    cause = exc.orig if isinstance(exc, DBAPIError) and isinstance(exc.orig, OSError) else exc
    if isinstance(cause, OSError):
        if cause.errno is not None:
            reason = os.strerror(cause.errno)
        elif isinstance(cause, TimeoutError):
            reason = "timed out"
        else:
            reason = type(cause).__name__
        return ConnectError(f"{doing}: could not connect to the database ({reason})")
    ours = translate(exc, doing)
    if isinstance(ours, ConnectionLostError) and not isinstance(ours, ConnectError):
        # Cut while connecting (mid-handshake): no statement was sent, so nothing ran.
        return ConnectError(f"{doing}: the connection was lost while it was being opened (nothing ran)")
    return ours


def closed_while_idle(conn: AsyncConnection) -> bool:
    """Whether the driver already knows that ``conn``'s connection is closed: it died idle, in the pool.

    Asks the driver's own connection (asyncpg's ``is_closed()``, psycopg's ``broken`` and ``closed``); no round
    trip. A connection whose death the driver has not yet seen passes, and fails at its first statement instead
    (psycopg reads nothing while idle, so it sees a backend's death only then).
    """
    driver = conn.sync_connection.connection.driver_connection if conn.sync_connection is not None else None
    is_closed = getattr(driver, "is_closed", None)
    if callable(is_closed):
        return bool(is_closed())
    broken = getattr(driver, "broken", None)  # psycopg: what it knows without reading the socket
    if broken is True or getattr(driver, "closed", None) is True:  # aiomysql's `closed` too
        return True
    return getattr(driver, "connected", True) is False  # asyncmy


_DEAD_IN_POOL = 64
"""How many connections found dead in a row, at checkout, before giving up: a pool of dead ones is drained."""


async def checkout(session: AsyncSession, doing: str, *, replace: bool) -> AsyncConnection:
    """``session``'s connection, with a failure to get one translated (`connect_error`).

    With ``replace`` (a session of ours, in which nothing was sent yet), a pooled connection that the driver
    knows died while idle is invalidated and another taken: nothing was sent on it, so nothing can have run.
    Without, or after `_DEAD_IN_POOL` dead ones, such a connection raises `ConnectionLostError` (nothing ran).
    """
    for _ in range(_DEAD_IN_POOL):
        try:
            conn = await session.connection()
        except InvalidRequestError:
            raise  # the session's own state (a caller's session used against its contract), not the database
        except Exception as exc:
            if (ours := connect_error(exc, doing)) is not None:
                raise ours from exc
            raise
        if not closed_while_idle(conn):
            return conn
        if not replace:
            break
        await session.invalidate()  # never back into the pool; the session takes a new one next time
    raise ConnectionLostError(f"{doing}: the pooled connection had died while idle (nothing was sent)")


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (ours or a driver's) says the database connection died."""
    return isinstance(exc, ConnectionLostError) or isinstance(translate(exc, ""), ConnectionLostError)


# SQLSTATE classes a retry can outlive: connection exception, transaction rollback, insufficient resources,
# object not in prerequisite state (lock timeouts), operator intervention, system error.
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "55", "57", "58"})


def transient(exc: StorageError) -> bool:
    """Whether a retry of the same work may succeed: a lost connection, an aborted transaction, a busy server.

    An error without SQLSTATE (a pool that timed out, a connection that could not be opened) counts as
    transient; an undefined table, a permission or a constraint (classes 42, 23, …) does not.
    """
    if isinstance(exc, ConnectionLostError | SerializationError):
        return True
    state = exc.sqlstate
    if state is None:
        return True
    if state.startswith("sqlite:"):
        return int(state[7:]) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    if (code := _mysql_state(state)) is not None:
        return code in _MYSQL_TRANSIENT
    return state[:2] in _TRANSIENT_CLASSES
