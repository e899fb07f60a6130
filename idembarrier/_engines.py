"""Engines set up the way the barrier needs them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

__all__ = ["create_engine", "create_sqlite_engine"]


def create_sqlite_engine(url: str, *, busy_timeout: float = 30.0) -> AsyncEngine:
    """Create a ``sqlite+aiosqlite`` engine fit for concurrent units of work.

    The database is put in WAL mode (readers never block the writer, so replays keep flowing while a unit
    of work holds the write lock) and each connection waits up to ``busy_timeout`` seconds for that lock
    instead of failing at once.
    """
    engine = create_async_engine(url, connect_args={"timeout": busy_timeout})

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def create_engine(url: str) -> AsyncEngine:
    """Create an engine for ``url``: `create_sqlite_engine` for SQLite, SQLAlchemy's defaults otherwise."""
    return create_sqlite_engine(url) if url.startswith("sqlite") else create_async_engine(url, pool_size=20)
