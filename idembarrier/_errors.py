"""The one place where driver errors become idembarrier's: classified by SQLSTATE, never by message text."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

from ._exceptions import ConnectionLostError, SerializationError, StorageError

__all__ = ["lock_not_available", "sqlstate_of", "translate"]

_LOCK_NOT_AVAILABLE = "55P03"  # a lock wait that ran out of lock_timeout

_SERIALIZATION = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
# Class 08 is connection_exception; 57P01-57P03 are admin_shutdown (pg_terminate_backend), crash_shutdown
# and cannot_connect_now.
_CONNECTION_LOST_PREFIX = "08"
_CONNECTION_LOST = frozenset({"57P01", "57P02", "57P03"})
# SQLite primary result codes (the low byte of the extended code).
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6

try:  # asyncpg is the PostgreSQL driver; it is optional, and only its raw exceptions need naming here.
    from asyncpg.exceptions import InterfaceError as _AsyncpgInterfaceError
except ImportError:  # pragma: no cover - asyncpg is installed wherever PostgreSQL is used
    _AsyncpgInterfaceError = ()


def sqlstate_of(exc: BaseException) -> str | None:
    """Return the SQLSTATE (PostgreSQL) or ``"sqlite:<code>"`` carried by a driver error, if any."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    state = getattr(orig, "sqlstate", None)
    if isinstance(state, str):
        return state
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return f"sqlite:{code}"
    return None


def lock_not_available(exc: BaseException) -> bool:
    """Whether ``exc`` says a bounded wait for a lock ran out.

    That is PostgreSQL's 55P03 (lock_timeout), SQLite's BUSY/LOCKED (busy timeout), or the driver's own
    statement timeout. During a claim it means a concurrent holder kept the key (PostgreSQL) or the
    database's write lock (SQLite) for longer than the unit of work may wait.
    """
    if isinstance(exc, TimeoutError):
        return True
    state = sqlstate_of(exc)
    if state is None:
        return False
    if state.startswith("sqlite:"):
        return int(state[7:]) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return state == _LOCK_NOT_AVAILABLE


def translate(exc: BaseException, doing: str) -> StorageError | None:
    """Return our exception for a driver error met while ``doing`` something, or ``None`` if not a driver's.

    The caller raises the result ``from exc``.
    """
    state = sqlstate_of(exc)
    invalidated = isinstance(exc, DBAPIError) and exc.connection_invalidated
    if state is not None and state in _SERIALIZATION:
        return SerializationError(f"{doing}: the database aborted the transaction ({state})", sqlstate=state)
    if (
        invalidated
        or isinstance(exc, _AsyncpgInterfaceError | ConnectionError)
        or (state is not None and (state.startswith(_CONNECTION_LOST_PREFIX) or state in _CONNECTION_LOST))
    ):
        return ConnectionLostError(f"{doing}: the database connection was lost ({state or 'closed'})", sqlstate=state)
    if state is not None and state.startswith("sqlite:") and int(state[7:]) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StorageError(f"{doing}: the SQLite database stayed locked past its busy timeout", sqlstate=state)
    if isinstance(exc, DBAPIError) or state is not None:
        return StorageError(f"{doing}: the database failed ({state or type(exc).__name__})", sqlstate=state)
    return None
