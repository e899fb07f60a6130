"""Schema installation and the start-up check, on top of the Alembic scripts shipped with the package."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import column, select, table

from ._config import DEFAULT_TABLE
from ._engines import check_url
from ._errors import POOLER_SQLSTATES, translate
from ._exceptions import ConfigurationError, ConnectionLostError, SchemaError, SerializationError
from ._schema import VERSION_TABLE

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["HEAD", "check_schema", "migrations_path", "upgrade"]

HEAD = "0007"
"""The newest migration revision; a test checks it is the scripts' single head."""

FIX = (
    "run `idembarrier migrate --database-url URL` (with --table and --schema if the barrier uses others) or "
    "`await idembarrier.upgrade(engine)` at start-up; from a checkout, `alembic upgrade head` does the same"
)


def migrations_path() -> Path:
    """Return the folder of the Alembic scripts, ``idembarrier/migrations`` (``idembarrier:migrations`` to Alembic)."""
    return Path(__file__).resolve().parent / "migrations"


async def upgrade(
    engine: AsyncEngine, *, revision: str = "head", table: str = DEFAULT_TABLE, schema: str | None = None
) -> None:
    """Install or update idembarrier's schema on ``engine``, in one transaction.

    Args:
        engine: The application's engine; the migrations run on one of its connections.
        revision: The revision to reach.
        table: Name of the records table (match the `Barrier`'s ``table``).
        schema: PostgreSQL schema to put it in (created if missing).

    Raises:
        ConfigurationError: The engine's database or driver is not supported, or it is in-memory SQLite;
            raised before any statement runs.
        SchemaError: The schema already holds idembarrier's version table for another records table:
            one records table per database schema (put a second one in another schema).
    """
    check_url(engine.url)
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, revision, table, schema)
        if revision == "head" and not await conn.run_sync(_has_table, table, schema):
            raise SchemaError(
                f"idembarrier's version table in schema {schema or 'default'!r} is at head for another records "
                f"table, so {table!r} was not created: keep one records table per schema"
            )


def _has_table(connection: Connection, name: str, schema: str | None) -> bool:
    from sqlalchemy import inspect

    return inspect(connection).has_table(name, schema=schema)


def _upgrade(connection: Connection, revision: str, table_name: str, schema: str | None) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.attributes.update(connection=connection, table=table_name, schema=schema)
    command.upgrade(config, revision)


async def check_schema(engine: AsyncEngine, *, schema: str | None = None) -> None:
    """Raise `SchemaError` unless idembarrier's migrations are at head on ``engine``.

    Raises `ConfigurationError` first when the engine is one the barrier does not support.
    """
    check_url(engine.url)
    try:
        async with engine.connect() as conn:
            await check_schema_on(conn, schema=schema)
    except SchemaError:
        raise
    except Exception as exc:
        if (error := translate(exc, "checking idembarrier's schema")) is None:
            raise
        raise error from exc


async def check_schema_on(conn: AsyncConnection, *, schema: str | None = None) -> None:
    """Raise `SchemaError` unless idembarrier's migrations are at head, reading through ``conn``.

    Runs on the caller's connection, so a unit of work never needs a second one from the pool. Raises
    `ConfigurationError` first when the engine is one the barrier does not support.
    """
    check_url(conn.engine.url)
    versions = table(VERSION_TABLE, column("version_num"), schema=schema)
    try:
        found = set((await conn.execute(select(versions.c.version_num))).scalars())
    except Exception as exc:
        error = translate(exc, "checking idembarrier's schema")
        if error is None:
            raise
        if isinstance(error, ConnectionLostError | SerializationError):
            raise error from exc
        if error.sqlstate in POOLER_SQLSTATES:  # the engine's prepared statements, behind a pooler
            raise ConfigurationError(str(error)) from exc
        # Any other database error here means the version table cannot be read: not installed.
        raise SchemaError(f"idembarrier's schema is not installed: {FIX}") from exc
    if found != {HEAD}:
        at = ", ".join(sorted(found)) or "nothing"
        raise SchemaError(f"idembarrier's schema is at {at}, this version needs {HEAD}: {FIX}")
