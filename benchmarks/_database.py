"""The database set-up the peers benchmarks share: the URL they default to, a fresh schema, the rows counted."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import idembarrier
from idembarrier._schema import VERSION_TABLE

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy import MetaData
    from sqlalchemy.engine import URL

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/idembarrier_peers"
ADMIN_DATABASE = "test"
"""The database the benchmarks connect to in order to create theirs."""
RECORDS = "idempotency_keys"


def installed(needs: Mapping[str, str], variant: str) -> bool:
    """Whether the package ``variant`` needs (by ``needs``; none if absent) is importable."""
    need = needs.get(variant)
    return need is None or importlib.util.find_spec(need) is not None


def on_mariadb(url: URL) -> bool:
    """Whether ``url`` names a MariaDB (or MySQL) server rather than PostgreSQL."""
    return url.get_backend_name() in {"mysql", "mariadb"}


async def create_databases(url: URL, fresh: Sequence[str] = ()) -> None:
    """Create ``url``'s database unless it exists, and each of ``fresh`` anew (dropped first if it exists).

    On PostgreSQL through an AUTOCOMMIT connection to the server's ``test`` database; on MariaDB through one
    to no database at all (MariaDB's DDL commits on its own).
    """
    mariadb = on_mariadb(url)
    admin_url = url.set(database="" if mariadb else ADMIN_DATABASE)
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            names = [str(url.database), *fresh]
            if mariadb:
                listed = ", ".join(f":n{i}" for i in range(len(names)))
                exists = text(f"SELECT schema_name FROM information_schema.schemata WHERE schema_name IN ({listed})")
                present = set((await conn.execute(exists, {f"n{i}": n for i, n in enumerate(names)})).scalars())
            else:
                exists = text("SELECT datname FROM pg_database WHERE datname = ANY(:names)")
                present = set((await conn.execute(exists, {"names": names})).scalars())
            quote = conn.dialect.identifier_preparer.quote
            force = "" if mariadb else " WITH (FORCE)"
            for name in fresh:
                if name in present:
                    await conn.exec_driver_sql(f"DROP DATABASE {quote(name)}{force}")
                await conn.exec_driver_sql(f"CREATE DATABASE {quote(name)}")
            if url.database not in present:
                await conn.exec_driver_sql(f"CREATE DATABASE {quote(str(url.database))}")
    finally:
        await admin.dispose()


async def fresh_tables(url: URL, metadata: MetaData, *, before: Sequence[str] = ()) -> None:
    """idembarrier's tables migrated anew and ``metadata``'s created, after the ``before`` statements."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in before:
                await conn.exec_driver_sql(statement)
            ours = [table.name for table in metadata.sorted_tables]
            tables = ", ".join([*ours, f"{RECORDS}_outbox", f"{RECORDS}_failures", RECORDS, VERSION_TABLE])
            await conn.exec_driver_sql(f"DROP TABLE IF EXISTS {tables}")
        await idembarrier.upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    finally:
        await engine.dispose()


async def payments_by_variant(url: URL, table: str) -> dict[str, int]:
    """The business rows of ``table`` per variant."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text(f"SELECT variant, count(*) FROM {table} GROUP BY variant"))
            return {str(v): int(n) for v, n in rows.all()}
    finally:
        await engine.dispose()
