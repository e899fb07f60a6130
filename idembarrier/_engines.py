"""Engines set up the way the barrier needs them, and the check that refuses engines whose guarantees fail."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

__all__ = ["SUPPORTED", "check_url", "create_async", "create_sqlite_engine"]

SUPPORTED = {
    "postgresql+asyncpg": "postgres",
    "postgresql+psycopg": "psycopg",
    "sqlite+aiosqlite": "sqlite",
    "mysql+asyncmy": "mysql",
    "mysql+aiomysql": "mysql",
    "mariadb+asyncmy": "mysql",
    "mariadb+aiomysql": "mysql",
}
"""The database+driver pairs the barrier is tested on, each with the extra that installs its driver.

MariaDB (10.6 or later) is reached through ``mysql+`` or ``mariadb+`` URLs; a MySQL server is refused at its
first connection (see `idembarrier._mysql`)."""

_EXAMPLES = (
    "postgresql+asyncpg://user@host/dbname, mysql+asyncmy://user@host/dbname (MariaDB) or "
    "sqlite+aiosqlite:///path/to/file.db"
)


def check_url(url: str | URL) -> URL:
    """Return ``url`` parsed when the barrier's guarantees hold on its database and driver.

    Raises:
        ConfigurationError: ``url`` does not parse; or names a database or driver other than
            PostgreSQL through asyncpg or psycopg 3, MariaDB through asyncmy or aiomysql and SQLite through
            aiosqlite (a URL without ``+driver`` picks
            SQLAlchemy's synchronous default); or an in-memory SQLite database.
    """
    try:
        parsed = make_url(url)
        pair = f"{parsed.get_backend_name()}+{parsed.get_driver_name()}"
    except ArgumentError as exc:  # unparsable, or a dialect SQLAlchemy does not know
        raise ConfigurationError(f"not a SQLAlchemy database URL ({exc}); give one such as {_EXAMPLES}") from exc
    if pair not in SUPPORTED or "+" not in parsed.drivername:  # postgresql:// is psycopg's synchronous side
        what = (
            f"database or driver {pair}"
            if "+" in parsed.drivername
            else f"URL without a driver, {parsed.drivername}:// (it picks the synchronous default, {pair})"
        )
        raise ConfigurationError(
            f"unsupported {what}: idembarrier supports postgresql+asyncpg, postgresql+psycopg, "
            f"mysql+asyncmy, mysql+aiomysql (MariaDB) and sqlite+aiosqlite; use a URL such as {_EXAMPLES}"
        )
    if pair == "sqlite+aiosqlite" and _in_memory(parsed):
        # Each connection gets its own empty in-memory database (or, shared-cache, one without the file locks
        # and busy timeout the claims rely on): concurrent units of work would not see each other's claims.
        raise ConfigurationError(
            "an in-memory SQLite database cannot hold idempotency records: each connection sees its own, "
            "so duplicates are not caught; use a file URL such as sqlite+aiosqlite:///idembarrier.db"
        )
    return parsed


def _in_memory(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or database.startswith("file::memory:") or url.query.get("mode") == "memory"


def create_sqlite_engine(url: str, *, busy_timeout: float = 30.0) -> AsyncEngine:
    """Create a ``sqlite+aiosqlite`` engine fit for concurrent units of work.

    The database is put in WAL mode (readers never block the writer, so replays keep flowing while a unit
    of work holds the write lock) and each connection waits up to ``busy_timeout`` seconds for that lock
    instead of failing at once.

    Raises:
        ConfigurationError: ``url`` is not a ``sqlite+aiosqlite`` URL of a file (in-memory databases are
            refused), or aiosqlite is not installed.
    """
    check_url(url)
    if make_url(url).get_backend_name() != "sqlite":
        raise ConfigurationError(
            f"create_sqlite_engine makes SQLite engines; for {make_url(url).drivername}:// use SQLAlchemy's "
            "create_async_engine"
        )
    engine = create_async(url, connect_args={"timeout": busy_timeout})

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def create_async(url: str, **kwargs: object) -> AsyncEngine:
    """SQLAlchemy's `create_async_engine`, with a driver that is not installed raised as `ConfigurationError`."""
    try:
        return create_async_engine(url, **kwargs)
    except ImportError as exc:
        pair = f"{make_url(url).get_backend_name()}+{make_url(url).get_driver_name()}"
        raise ConfigurationError(
            f"the {pair} driver is not installed: pip install 'idembarrier[{SUPPORTED[pair]}]'"
        ) from exc
