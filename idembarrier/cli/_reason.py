"""The reason a database failure gives, read from the driver's (or the OS's) exception's own fields.

`translate` decides what a failure *is* (by SQLSTATE); this says *why*, in the server's words, for a person:
``database "shop" does not exist (SQLSTATE 3D000)``, ``Connection refused``, ``Name or service not known``.
Nothing here matches message text: PostgreSQL's message comes from asyncpg's ``message`` field, an OS error's
from its ``errno``, a resolver's from its ``strerror``.
"""

from __future__ import annotations

import os
import socket
import sqlite3

from sqlalchemy.exc import TimeoutError as PoolTimeoutError

__all__ = ["driver_reason"]

try:  # asyncpg is optional; only its exception classes are needed here.
    from asyncpg.exceptions import InterfaceError as _AsyncpgInterfaceError
    from asyncpg.exceptions import InternalClientError as _AsyncpgClientError
    from asyncpg.exceptions import PostgresError as _AsyncpgPostgresError
except ImportError:  # pragma: no cover - asyncpg is installed wherever PostgreSQL is used
    _AsyncpgInterfaceError = _AsyncpgClientError = _AsyncpgPostgresError = ()


def driver_reason(exc: BaseException) -> str | None:
    """The reason behind ``exc``, on one line, from the first driver or OS exception in its chain.

    Returns ``None`` when the chain holds none (the failure is not the database's).
    """
    for cause in _chain(exc):
        reason = _reason_of(cause)
        if reason is not None:
            return " ".join(reason.split())
    return None


def _reason_of(exc: BaseException) -> str | None:
    if isinstance(exc, _AsyncpgPostgresError):
        return f"{getattr(exc, 'message', None) or exc} (SQLSTATE {exc.sqlstate})"
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", None)
        return f"{exc} ({name})" if name else str(exc)
    if isinstance(exc, socket.gaierror):
        return str(exc.strerror or exc)
    if isinstance(exc, OSError):  # ConnectionRefusedError, TimeoutError, ...
        if exc.errno is not None:
            return os.strerror(exc.errno)
        return "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
    if isinstance(exc, _AsyncpgInterfaceError | _AsyncpgClientError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, PoolTimeoutError):
        return "no pooled connection became free in time"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps, outermost first: SQLAlchemy's ``orig``, then causes and contexts."""
    seen: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        orig = getattr(current, "orig", None)
        pending += [c for c in (orig, current.__cause__, current.__context__) if isinstance(c, BaseException)]
    return seen
