"""Alembic environment for idembarrier's own tables, with its own version table.

Run from the repository root, whose ``alembic.ini`` points here (``script_location = idembarrier:migrations``):
``IDEMBARRIER_DATABASE_URL=postgresql+asyncpg://… alembic upgrade head``
(``-x table=NAME -x schema=NAME`` to place the records table). `idembarrier.upgrade()` runs the same
scripts on a connection it passes in ``config.attributes``.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection, MetaData
from sqlalchemy.ext.asyncio import create_async_engine

from idembarrier._schema import VERSION_TABLE, records_table

config = context.config
_x = context.get_x_argument(as_dictionary=True)
TABLE: str = config.attributes.get("table") or _x.get("table") or "idempotency_keys"
SCHEMA: str | None = config.attributes.get("schema") or _x.get("schema") or None
config.attributes.update(table=TABLE, schema=SCHEMA)

target_metadata = MetaData()
records_table(target_metadata, TABLE, SCHEMA)


def _ours(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate looks at idembarrier's tables only, never at the application's."""
    return type_ != "table" or name == TABLE


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        version_table_schema=SCHEMA,
        include_name=_ours,
        include_schemas=SCHEMA is not None,
        **kwargs,  # type: ignore[arg-type]
    )


def run_on(connection: Connection) -> None:
    if SCHEMA is not None and connection.dialect.name == "postgresql":
        quoted = connection.dialect.identifier_preparer.quote(SCHEMA)
        connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = os.environ.get("IDEMBARRIER_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set IDEMBARRIER_DATABASE_URL to the database to migrate")
    return url


async def _run_online() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run_on)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    run_on(connection)
else:
    asyncio.run(_run_online())
