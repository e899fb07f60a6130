"""Transaction poolers in front of PostgreSQL (PgBouncer, Neon's and Supabase's pooled endpoints).

A pooler in transaction mode hands each transaction whichever server session is free. idembarrier keeps no
session state across transactions (its lock timeouts are ``set_config(…, true)``, its advisory locks
transaction-scoped; LISTEN needs a session and the relay checks it, see `idembarrier._listen`), but the
drivers do: asyncpg's statement cache and SQLAlchemy's prepared statements are named and kept per client
connection, and psycopg prepares a query on the server after a few runs. Behind a pooler those statements
are missing (SQLSTATE 26000) or taken (42P05) in the next transaction's session, at random.

So in a barrier's first transaction the connection is checked, once: the backend process id the server
reported when the connection was opened (its BackendKeyData) is the backend's own on a direct connection,
while a pooler answers the startup itself, with a key of its own. Behind a pooler, the engine must keep
nothing on the server across transactions, or the barrier refuses at once with a `ConfigurationError` that
names the settings, instead of failing some calls later. What the drivers keep is read from what the server
shows (``pg_prepared_statements``, which lists the session's named statements), for a statement text unique
to the check, all in the one transaction, so in one server session.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from ._errors import POOLER_SQLSTATES, sqlstate_of
from ._exceptions import ConfigurationError
from ._storage import pool_connection

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["SAFE_CONNECT_ARGS", "behind_pooler", "check_asyncpg", "check_psycopg"]

_DOCS = "see the guide's Engines page, 'Transaction poolers'"
_ASYNCPG_SETTINGS = (
    "create_async_engine(url + '?prepared_statement_cache_size=0', connect_args={'statement_cache_size': 0, "
    "'prepared_statement_name_func': lambda: f'__asyncpg_{uuid.uuid4()}__'})"
)
_PSYCOPG_SETTINGS = "create_async_engine(url, connect_args={'prepare_threshold': None})"
_BACKEND = "SELECT pg_backend_pid()"
SAFE_CONNECT_ARGS: dict[str, dict[str, object]] = {
    "postgresql+asyncpg": {"statement_cache_size": 0},
    "postgresql+psycopg": {"prepare_threshold": None},
}
"""Connect arguments with which each PostgreSQL driver keeps no prepared statement in a server session."""
_PREPARED = "SELECT name FROM pg_prepared_statements WHERE statement = $1"


async def check_asyncpg(conn: AsyncConnection) -> None:
    """Refuse an asyncpg engine that keeps statements across transactions when a pooler is in front."""
    adapted = (await pool_connection(conn)).dbapi_connection
    driver: Any = adapted.driver_connection if adapted is not None else None
    try:
        kept = await _kept(conn, driver)
    except Exception as exc:
        if sqlstate_of(exc) not in POOLER_SQLSTATES:
            raise
        # The check's own statements met another client's (or missed their own): that is the answer.
        kept = [f"a prepared statement of another server session ({sqlstate_of(exc)})"]
    if kept:
        raise ConfigurationError(
            "a transaction pooler is in front of PostgreSQL (the backend differs from the one the connection "
            f"was opened with), and this engine keeps prepared statements across transactions ({'; '.join(kept)}): "
            f"they would fail at random. Build the engine with {_ASYNCPG_SETTINGS} ({_DOCS})"
        )


async def _kept(conn: AsyncConnection, driver: Any) -> list[str]:
    """What the drivers under ``conn`` keep on the server across transactions, behind a pooler; direct: nothing."""
    # SQLAlchemy's statements first: the first one (the pooler check's) opens SQLAlchemy's transaction if none
    # is open yet, and every later statement of the check then reaches the same server session.
    if not await behind_pooler(conn):
        return []  # a direct connection: the server reported its own backend at startup
    kept = []
    probe = _probe()
    await conn.exec_driver_sql(probe)
    first = await _names(driver, probe)
    await conn.exec_driver_sql(probe)
    second = await _names(driver, probe)
    if any(name.startswith("__asyncpg_stmt_") for name in first | second):
        kept.append("asyncpg's default statement names (another client's may be taken)")
    if first and second == first:  # the second run reused the first one's statement: SQLAlchemy's cache
        kept.append("SQLAlchemy's prepared-statement cache")
    probe = _probe()
    await driver.fetchval(probe)
    if await _names(driver, probe):  # asyncpg named (and cached) the statement: its statement cache is on
        kept.append("asyncpg's statement cache")
    return kept


async def check_psycopg(conn: AsyncConnection) -> None:
    """Refuse a psycopg engine that prepares statements on the server when a pooler is in front."""
    adapted = (await pool_connection(conn)).dbapi_connection
    driver: Any = adapted.driver_connection if adapted is not None else None
    if driver.prepare_threshold is None or not await behind_pooler(conn):
        return  # nothing is ever prepared on the server, or a direct connection
    raise ConfigurationError(
        "a transaction pooler is in front of PostgreSQL (the backend differs from the one the connection was "
        f"opened with), and psycopg prepares statements on the server after {driver.prepare_threshold} runs: "
        f"they would fail at random. Build the engine with {_PSYCOPG_SETTINGS} ({_DOCS})"
    )


async def behind_pooler(conn: AsyncConnection) -> bool:
    """Whether ``conn`` reaches PostgreSQL through a pooler: its backend is not the one it was opened with."""
    adapted = (await pool_connection(conn)).dbapi_connection
    driver: Any = adapted.driver_connection if adapted is not None else None
    backend = (await conn.exec_driver_sql(_BACKEND)).scalar_one()
    opened = driver.get_server_pid() if hasattr(driver, "get_server_pid") else driver.info.backend_pid
    return bool(backend != opened)


def _probe() -> str:
    """A statement text no other client sends, so that only this check's own statements match it."""
    return f"SELECT 1 AS idembarrier_pooler_check_{uuid.uuid4().hex}"


async def _names(driver: Any, probe: str) -> set[str]:
    """The names under which this server session holds ``probe`` prepared (asyncpg's unnamed ones are not listed)."""
    return {str(row["name"]) for row in await driver.fetch(_PREPARED, probe)}
