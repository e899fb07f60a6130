"""An application's own Alembic autogenerate, with `idembarrier.include_object`, leaves idembarrier's tables alone.

Each test makes an application's Alembic environment with ``alembic init`` in a temporary folder, gives it an
``env.py`` of the usual shape over an application model, installs idembarrier's schema in a fresh PostgreSQL
database, runs ``alembic revision --autogenerate`` as the application's developer would, and reads the script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Column, Integer, MetaData, String, Table
from sqlalchemy.ext.asyncio import create_async_engine

import idembarrier
from idembarrier._alembic import owned_tables
from idembarrier._schema import VERSION_TABLE
from tests.helpers import fresh_database

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

ROOT = Path(__file__).resolve().parent.parent

ENV_PY = '''\
"""The application's env.py: its own model, its own version table, idembarrier's filter."""
import asyncio
import os

from alembic import context
from sqlalchemy import Column, Integer, MetaData, String, Table
from sqlalchemy.ext.asyncio import create_async_engine

import idembarrier

target_metadata = MetaData()
Table("app_orders", target_metadata, Column("id", Integer, primary_key=True), Column("note", String(50)))
# Named like idembarrier's tables, but the application's own: the filter must not hide it.
Table("idempotency_keys_archive", target_metadata, Column("id", Integer, primary_key=True))

FILTER, TABLE, SCHEMA = os.environ["APP_FILTER"], os.environ["APP_TABLE"], os.environ.get("APP_SCHEMA") or None
hooks = {}
if FILTER == "default":
    hooks["include_object"] = idembarrier.include_object
elif FILTER == "custom":
    hooks["include_object"] = idembarrier.include_object_for(table=TABLE, schema=SCHEMA)


def run(connection):
    context.configure(
        connection=connection, target_metadata=target_metadata, include_schemas=SCHEMA is not None, **hooks
    )
    with context.begin_transaction():
        context.run_migrations()


async def main():
    engine = create_async_engine(os.environ["APP_DATABASE_URL"])
    async with engine.connect() as connection:
        await connection.run_sync(run)
    await engine.dispose()


asyncio.run(main())
'''


@pytest.fixture
async def app_database() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one application (dropped afterwards)."""
    async with fresh_database("idembarrier_app") as url:
        yield url.render_as_string(hide_password=False)


async def _install(url: str, *, table: str = "idempotency_keys", schema: str | None = None) -> None:
    engine = create_async_engine(url)
    try:
        await idembarrier.upgrade(engine, table=table, schema=schema)
    finally:
        await engine.dispose()


def autogenerate(
    tmp_path: Path, url: str, *, hook: str, table: str = "idempotency_keys", schema: str | None = None
) -> str:
    """``alembic init`` an application environment, run ``revision --autogenerate`` in it; return the script."""
    ini = tmp_path / "alembic.ini"
    command.init(Config(str(ini)), str(tmp_path / "migrations"), template="generic")
    (tmp_path / "migrations" / "env.py").write_text(ENV_PY)
    env = {**os.environ, "APP_DATABASE_URL": url, "APP_FILTER": hook, "APP_TABLE": table, "APP_SCHEMA": schema or ""}
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "revision", "--autogenerate", "-m", "probe"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (script,) = (tmp_path / "migrations" / "versions").glob("*_probe.py")
    return script.read_text()


def _upgrade_body(script: str) -> str:
    return script.split("def upgrade()", 1)[1].split("def downgrade()", 1)[0]


def test_owned_tables_are_the_declared_tables_and_the_version_table() -> None:
    """The filter's names come from the schema declaration: records, outbox, failures, version table."""
    metadata = MetaData()
    idembarrier._schema.records_table(metadata, "dedup")
    assert owned_tables("dedup") == {*(t.name for t in metadata.tables.values()), VERSION_TABLE}
    assert owned_tables("dedup") >= {"dedup", "dedup_outbox", "dedup_failures", VERSION_TABLE}


async def test_without_the_filter_autogenerate_proposes_dropping_idembarriers_tables(
    tmp_path: Path, app_database: str
) -> None:
    """The control: an env.py without the filter proposes drop_table for each of idembarrier's tables."""
    await _install(app_database)
    body = _upgrade_body(autogenerate(tmp_path, app_database, hook="none"))
    for name in owned_tables():
        assert f"op.drop_table('{name}')" in body


async def test_include_object_keeps_autogenerate_off_idembarriers_tables(tmp_path: Path, app_database: str) -> None:
    """With ``include_object=idembarrier.include_object`` no operation names an idembarrier table."""
    await _install(app_database)
    script = autogenerate(tmp_path, app_database, hook="default")
    for name in owned_tables():
        assert f"'{name}'" not in script
    body = _upgrade_body(script)
    assert "op.create_table('app_orders'" in body  # the application's own changes still come through
    assert "op.create_table('idempotency_keys_archive'" in body


async def test_include_object_for_a_renamed_records_table(tmp_path: Path, app_database: str) -> None:
    """``include_object_for(table=...)`` leaves out the tables of a records table with another name."""
    await _install(app_database, table="dedup_keys")
    script = autogenerate(tmp_path, app_database, hook="custom", table="dedup_keys")
    for name in owned_tables("dedup_keys"):
        assert f"'{name}'" not in script
    assert "op.create_table('app_orders'" in _upgrade_body(script)


async def test_include_object_for_a_records_table_in_its_own_schema(tmp_path: Path, app_database: str) -> None:
    """With ``include_schemas=True``, ``include_object_for(schema=...)`` leaves out that schema's tables."""
    await _install(app_database, schema="idem")
    script = autogenerate(tmp_path, app_database, hook="custom", schema="idem")
    for name in owned_tables():
        assert f"'{name}'" not in script
    assert "op.create_table('app_orders'" in _upgrade_body(script)


def test_the_filter_keeps_an_application_table_of_the_same_name_in_another_schema() -> None:
    """A table named like idembarrier's in another schema than the one given is the application's."""
    hook = idembarrier.include_object_for(schema="idem")
    theirs = Table("idempotency_keys", MetaData(), Column("id", Integer), schema="public")
    ours = Table("idempotency_keys", MetaData(), Column("id", Integer), Column("s", String), schema="idem")
    assert hook(theirs, "idempotency_keys", "table", True, None)
    assert not hook(ours, "idempotency_keys", "table", True, None)
    assert not hook(ours.c.s, "s", "column", True, None)


async def test_schema_error_names_idembarrier_migrate_and_upgrade_first(app_database: str) -> None:
    """The SchemaError of a database without the schema names `idembarrier migrate`, then `upgrade(engine)`."""
    engine = create_async_engine(app_database)
    try:
        with pytest.raises(idembarrier.SchemaError) as caught:
            await idembarrier.check_schema(engine)
    finally:
        await engine.dispose()
    message = str(caught.value)
    assert message.index("`idembarrier migrate") < message.index("`await idembarrier.upgrade(engine)`")
    assert "idembarrier repository" not in message
