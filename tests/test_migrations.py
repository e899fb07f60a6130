"""The Alembic scripts: they produce the declared schema, under their own version table, from code and CLI.

Each test migrates a database of its own, created empty (PostgreSQL) or as a fresh file (SQLite), rather
than a clone of the session's migrated template: here the migrations themselves are under test.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

import idembarrier
from idembarrier._migrate import HEAD, migrations_path
from idembarrier._schema import VERSION_TABLE, records_table
from tests.conftest import ADMIN_URL, MARIADB_URL, _admin, _mariadb_admin
from tests.helpers import require

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CUSTOM_TABLE = "idem_custom"
CUSTOM_SCHEMA = "idem_schema"


@dataclass
class Empty:
    """A database without any table: its URL and engine."""

    url: str
    engine: AsyncEngine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name


async def _new_pg_database() -> str:
    name = f"idembarrier_m_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    return name


@pytest.fixture
async def empty_pg() -> AsyncIterator[Empty]:
    name = await _new_pg_database()
    url = ADMIN_URL.set(database=name)
    engine = create_async_engine(url)
    try:
        yield Empty(url.render_as_string(hide_password=False), engine)
    finally:
        await engine.dispose()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def empty_sqlite(tmp_path: Path) -> AsyncIterator[Empty]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    engine = idembarrier.create_sqlite_engine(url)
    try:
        yield Empty(url, engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def empty_mariadb() -> AsyncIterator[Empty]:
    """An empty MariaDB database (asyncmy), dropped afterwards."""
    name = f"idembarrier_m_{uuid.uuid4().hex[:12]}"
    require(await _mariadb_admin(f"CREATE DATABASE `{name}`"), "MariaDB does not answer")
    url = MARIADB_URL.set(database=name)
    engine = create_async_engine(url)
    try:
        yield Empty(url.render_as_string(hide_password=False), engine)
    finally:
        await engine.dispose()
        await _mariadb_admin(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(params=["pg", "sqlite", "mariadb"], ids=["postgresql", "sqlite", "mariadb"])
def empty(request: pytest.FixtureRequest) -> Empty:
    """Tests that make sense on every engine run on every one."""
    database: Empty = request.getfixturevalue(f"empty_{request.param}")
    return database


@pytest.fixture(params=["pg", "sqlite"], ids=["postgresql", "sqlite"])
def empty_pg_or_sqlite(request: pytest.FixtureRequest) -> Empty:
    """Tests whose SQL or type comparison is PostgreSQL's and SQLite's: MariaDB's migrations use its own column
    types (LONGBLOB, DATETIME(6)), which autogenerate reports as changes of the declared generic ones."""
    database: Empty = request.getfixturevalue(f"empty_{request.param}")
    return database


@pytest.fixture
async def twin(empty: Empty, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Empty]:
    """A second empty database on the same engine as ``empty``."""
    if empty.dialect == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'twin.db'}"
        engine = idembarrier.create_sqlite_engine(url)
        try:
            yield Empty(url, engine)
        finally:
            await engine.dispose()
        return
    if empty.dialect == "mysql":
        twin: Empty = request.getfixturevalue("empty_mariadb")
        yield twin
        return
    name = await _new_pg_database()
    pg_url = ADMIN_URL.set(database=name)
    engine = create_async_engine(pg_url)
    try:
        yield Empty(pg_url.render_as_string(hide_password=False), engine)
    finally:
        await engine.dispose()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def table_names(engine: AsyncEngine, schema: str | None = None) -> set[str]:
    async with engine.connect() as conn:
        names: list[str] = await conn.run_sync(lambda c: inspect(c).get_table_names(schema=schema))
    return set(names)


async def versions(engine: AsyncEngine, table: str = VERSION_TABLE, schema: str | None = None) -> list[str]:
    quote = engine.dialect.identifier_preparer.quote
    qualified = f"{quote(schema)}.{quote(table)}" if schema else quote(table)
    async with engine.connect() as conn:
        return list((await conn.exec_driver_sql(f"SELECT version_num FROM {qualified}")).scalars())


async def schema_diff(engine: AsyncEngine, table: str = "idempotency_keys", schema: str | None = None) -> list[object]:
    """Return what autogenerate finds between the migrated database and `records_table`."""
    metadata = MetaData()
    records_table(metadata, table, schema, dialect=engine.dialect.name)

    def compare(connection: Connection) -> list[object]:
        context = MigrationContext.configure(
            connection,
            opts={
                "version_table": VERSION_TABLE,
                "version_table_schema": schema,
                "include_schemas": schema is not None,
            },
        )
        return list(compare_metadata(context, metadata))

    async with engine.connect() as conn:
        return await conn.run_sync(compare)


async def reflect(engine: AsyncEngine, table: str = "idempotency_keys") -> dict[str, object]:
    """Describe the records table as the database reports it, constraints and index predicates included."""

    def describe(connection: Connection) -> dict[str, object]:
        inspector = inspect(connection)
        return {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], c.get("default")) for c in inspector.get_columns(table)
            ],
            "primary_key": inspector.get_pk_constraint(table),
            "checks": sorted((c["name"] or "", c["sqltext"]) for c in inspector.get_check_constraints(table)),
            "indexes": sorted(
                (i["name"] or "", repr(i["column_names"]), repr({k: str(v) for k, v in options.items()}))
                for i in inspector.get_indexes(table)
                for options in [i.get("dialect_options", {})]
            ),
        }

    async with engine.connect() as conn:
        return await conn.run_sync(describe)


def alembic_config(connection: Connection, table: str, schema: str | None) -> Config:
    """Configure Alembic on a connection the way `idembarrier.upgrade` does."""
    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.attributes.update(connection=connection, table=table, schema=schema)
    return config


async def run_command(
    engine: AsyncEngine, name: str, revision: str, table: str = "idempotency_keys", schema: str | None = None
) -> None:
    """Run ``alembic <name> <revision>`` (upgrade or downgrade) on one transaction of ``engine``."""
    step = getattr(command, name)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: step(alembic_config(c, table, schema), revision))


async def run(args: Sequence[str | Path], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a process to its end; fail the test with its output unless it succeeds."""
    result = await anyio.run_process([str(a) for a in args], cwd=cwd, env=env, check=False)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{output}"
    return result.stdout.decode()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would point Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env.update(extra)
    return env


async def test_upgrade_from_empty_creates_records_table_at_head(empty: Empty) -> None:
    """Upgrading an empty database creates the records table and records HEAD in idembarrier's table."""
    await idembarrier.upgrade(empty.engine)
    assert await table_names(empty.engine) == {
        "idempotency_keys",
        "idempotency_keys_outbox",
        "idempotency_keys_failures",
        VERSION_TABLE,
    }
    assert await versions(empty.engine) == [HEAD]


async def test_upgrade_leaves_application_alembic_version_intact(empty: Empty) -> None:
    """The application's own alembic_version table and revision survive idembarrier's upgrade."""
    async with empty.engine.begin() as conn:
        await conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        await conn.exec_driver_sql("INSERT INTO alembic_version (version_num) VALUES ('app_0042')")
    await idembarrier.upgrade(empty.engine)
    assert await versions(empty.engine, "alembic_version") == ["app_0042"]
    assert await versions(empty.engine) == [HEAD]


async def test_migrated_schema_matches_declared_metadata(empty_pg_or_sqlite: Empty) -> None:
    """Autogenerate finds no difference between the migrated database and `records_table`."""
    empty = empty_pg_or_sqlite
    await idembarrier.upgrade(empty.engine)
    assert await schema_diff(empty.engine) == []


async def test_migrated_table_equals_create_all_of_declared_table(empty: Empty, twin: Empty) -> None:
    """The migrated table reflects exactly like `records_table` created directly, checks and predicates too.

    Autogenerate compares neither CHECK constraints nor partial-index predicates, so this covers them.
    """
    await idembarrier.upgrade(empty.engine)
    metadata = MetaData()
    records_table(metadata, dialect=twin.dialect)
    async with twin.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    assert await reflect(empty.engine) == await reflect(twin.engine)


async def test_custom_table_and_schema_match_declared_metadata(empty_pg: Empty) -> None:
    """A custom table name in a PostgreSQL schema migrates to exactly the declared table."""
    await idembarrier.upgrade(empty_pg.engine, table=CUSTOM_TABLE, schema=CUSTOM_SCHEMA)
    assert await table_names(empty_pg.engine, CUSTOM_SCHEMA) == {
        CUSTOM_TABLE,
        f"{CUSTOM_TABLE}_outbox",
        f"{CUSTOM_TABLE}_failures",
        VERSION_TABLE,
    }
    assert await table_names(empty_pg.engine) == set()
    assert await versions(empty_pg.engine, schema=CUSTOM_SCHEMA) == [HEAD]
    assert await schema_diff(empty_pg.engine, CUSTOM_TABLE, CUSTOM_SCHEMA) == []


async def test_barrier_runs_on_custom_table_and_schema(empty_pg: Empty) -> None:
    """A barrier configured with the custom table and schema completes a unit of work and replays it."""
    await idembarrier.upgrade(empty_pg.engine, table=CUSTOM_TABLE, schema=CUSTOM_SCHEMA)
    barrier = idembarrier.Barrier(async_sessionmaker(empty_pg.engine), table=CUSTOM_TABLE, schema=CUSTOM_SCHEMA)
    calls = 0

    async def handler(session: AsyncSession) -> idembarrier.JSON:
        nonlocal calls
        calls += 1
        return {"done": calls}

    first = await barrier.execute("order-1", handler, scope="payments")
    second = await barrier.execute("order-1", handler, scope="payments")
    assert first == second == {"done": 1}
    assert calls == 1
    async with empty_pg.engine.connect() as conn:
        sql = f'SELECT scope, key, status FROM "{CUSTOM_SCHEMA}"."{CUSTOM_TABLE}"'
        rows = [tuple(row) for row in (await conn.exec_driver_sql(sql)).all()]
    assert rows == [("payments", "order-1", "COMPLETED")]


async def test_barriers_of_two_records_tables_on_one_engine_each_write_their_own(empty_pg: Empty) -> None:
    """Units of work of a barrier on the default table and of one on a custom table and schema, taken in turns
    on one engine (so on the same pooled connections), each record their keys in their own table only."""
    await idembarrier.upgrade(empty_pg.engine)
    await idembarrier.upgrade(empty_pg.engine, table=CUSTOM_TABLE, schema=CUSTOM_SCHEMA)
    sessionmaker = async_sessionmaker(empty_pg.engine)
    default = idembarrier.Barrier(sessionmaker)
    custom = idembarrier.Barrier(sessionmaker, table=CUSTOM_TABLE, schema=CUSTOM_SCHEMA)

    async def handler(session: AsyncSession) -> idembarrier.JSON:
        return None

    for i in range(3):
        await default.execute(f"default-{i}", handler, scope="s")
        await custom.execute(f"custom-{i}", handler, scope="s")
    async with empty_pg.engine.connect() as conn:
        tables = {"default": "idempotency_keys", "custom": f'"{CUSTOM_SCHEMA}"."{CUSTOM_TABLE}"'}
        keys = {
            which: sorted((await conn.exec_driver_sql(f"SELECT key FROM {table}")).scalars())
            for which, table in tables.items()
        }
    assert keys == {which: [f"{which}-{i}" for i in range(3)] for which in tables}


def test_scripts_have_one_head_equal_to_head_constant() -> None:
    """The migration scripts have exactly one head, and it is `HEAD`."""
    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    assert ScriptDirectory.from_config(config).get_heads() == [HEAD]


async def test_downgrade_to_base_then_upgrade_restores_schema(empty: Empty) -> None:
    """Downgrading to base drops the records table; upgrading again brings back the same schema at HEAD."""
    await run_command(empty.engine, "upgrade", "head")
    # MariaDB's migrations use its own column types (LONGBLOB, DATETIME(6)), which autogenerate reports against
    # the declared generic ones: there the restored schema must equal the first upgrade's, difference for difference.
    first = repr(await schema_diff(empty.engine))
    assert first == "[]" or empty.dialect == "mysql"
    await run_command(empty.engine, "downgrade", "base")
    assert await table_names(empty.engine) == {VERSION_TABLE}
    assert await versions(empty.engine) == []
    await run_command(empty.engine, "upgrade", "head")
    assert await versions(empty.engine) == [HEAD]
    assert repr(await schema_diff(empty.engine)) == first


async def test_downgrade_then_upgrade_in_custom_schema(empty_pg: Empty) -> None:
    """Downgrade and upgrade honour the custom table name and PostgreSQL schema."""
    await run_command(empty_pg.engine, "upgrade", "head", CUSTOM_TABLE, CUSTOM_SCHEMA)
    await run_command(empty_pg.engine, "downgrade", "base", CUSTOM_TABLE, CUSTOM_SCHEMA)
    assert await table_names(empty_pg.engine, CUSTOM_SCHEMA) == {VERSION_TABLE}
    await run_command(empty_pg.engine, "upgrade", "head", CUSTOM_TABLE, CUSTOM_SCHEMA)
    assert await versions(empty_pg.engine, schema=CUSTOM_SCHEMA) == [HEAD]
    assert await schema_diff(empty_pg.engine, CUSTOM_TABLE, CUSTOM_SCHEMA) == []


async def test_barrier_without_schema_raises_schema_error_naming_fix(empty: Empty) -> None:
    """A barrier on a database without the schema raises `SchemaError` naming `alembic upgrade head`."""
    barrier = idembarrier.Barrier(async_sessionmaker(empty.engine))

    async def handler(session: AsyncSession) -> idembarrier.JSON:
        raise AssertionError("the body must not run")  # pragma: no cover - the check fails first

    with pytest.raises(idembarrier.SchemaError, match="alembic upgrade head"):
        await barrier.execute("order-1", handler, scope="payments")


async def test_check_schema_fails_after_downgrade_to_base(empty: Empty) -> None:
    """`check_schema` names the missing revision once the schema was downgraded to base."""
    await idembarrier.upgrade(empty.engine)
    await run_command(empty.engine, "downgrade", "base")
    with pytest.raises(idembarrier.SchemaError, match=f"at nothing, this version needs {HEAD}"):
        await idembarrier.check_schema(empty.engine)


async def test_check_schema_passes_after_upgrade(empty: Empty) -> None:
    """`check_schema` accepts a database upgraded to head."""
    await idembarrier.upgrade(empty.engine)
    await idembarrier.check_schema(empty.engine)


async def test_check_schema_passes_in_custom_schema(empty_pg: Empty) -> None:
    """`check_schema` finds the version table in the PostgreSQL schema it was installed into."""
    await idembarrier.upgrade(empty_pg.engine, table=CUSTOM_TABLE, schema=CUSTOM_SCHEMA)
    await idembarrier.check_schema(empty_pg.engine, schema=CUSTOM_SCHEMA)


async def test_cli_upgrade_head_installs_schema(empty_pg: Empty) -> None:
    """`alembic upgrade head` from the repository root installs the schema in IDEMBARRIER_DATABASE_URL."""
    env = clean_env(IDEMBARRIER_DATABASE_URL=empty_pg.url)
    await run([BIN / "alembic", "upgrade", "head"], cwd=REPO, env=env)
    assert await versions(empty_pg.engine) == [HEAD]
    assert await schema_diff(empty_pg.engine) == []


async def test_cli_places_table_with_x_arguments(empty_pg: Empty) -> None:
    """`alembic -x table=… -x schema=… upgrade head` places the records table where it is told."""
    env = clean_env(IDEMBARRIER_DATABASE_URL=empty_pg.url)
    args = ["-x", f"table={CUSTOM_TABLE}", "-x", f"schema={CUSTOM_SCHEMA}", "upgrade", "head"]
    await run([BIN / "alembic", *args], cwd=REPO, env=env)
    assert await versions(empty_pg.engine, schema=CUSTOM_SCHEMA) == [HEAD]
    assert await schema_diff(empty_pg.engine, CUSTOM_TABLE, CUSTOM_SCHEMA) == []


PROBE = """
import asyncio, sys
from sqlalchemy.ext.asyncio import create_async_engine
import idembarrier
from idembarrier._migrate import migrations_path

async def main(url):
    engine = create_async_engine(url)
    try:
        await idembarrier.upgrade(engine)
        await idembarrier.check_schema(engine)
        async with engine.connect() as conn:
            sql = "SELECT version_num FROM idembarrier_alembic_version"
            version = (await conn.exec_driver_sql(sql)).scalar_one()
    finally:
        await engine.dispose()
    print(version, idembarrier.__file__, migrations_path(), sep="\\n")

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.timeout(300)
async def test_built_wheel_carries_and_runs_migrations(empty_pg: Empty, tmp_path: Path) -> None:
    """The wheel ships the scripts, and an install of it upgrades a database away from the checkout."""
    dist = tmp_path / "dist"
    build: list[str | Path] = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, REPO]
    # The dev venv need not hold the build backend; without it pip builds in isolation, fetching hatchling.
    if importlib.util.find_spec("hatchling") is not None:
        build.insert(4, "--no-build-isolation")
    await run(build, cwd=tmp_path)
    (wheel,) = dist.glob("idembarrier-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    shipped = {f"idembarrier/migrations/{name}" for name in ("env.py", "script.py.mako", "versions/0001_records.py")}
    assert shipped <= names

    # A venv of its own, without system site-packages, with the wheel's declared dependencies installed
    # from the package index: the probe then sees only what a user installing the wheel would get.
    venv = tmp_path / "venv"
    await run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    await run([python, "-m", "pip", "install", "--quiet", wheel, "asyncpg"], cwd=tmp_path)

    # Run from outside the repository, so neither the checkout's package nor its migrations are in reach.
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "probe.py").write_text(PROBE)
    output = await run([python, "probe.py", empty_pg.url], cwd=work, env=clean_env())
    version, module, scripts = output.splitlines()
    assert version == HEAD
    assert Path(module).is_relative_to(venv)
    assert Path(scripts).is_relative_to(venv)
    assert Path(scripts).name == "migrations"
    assert await versions(empty_pg.engine) == [HEAD]


async def test_a_second_records_table_in_the_same_schema_is_refused(empty: Empty) -> None:
    """Upgrading for another table name where the version table is already at head raises SchemaError."""
    await idembarrier.upgrade(empty.engine)
    with pytest.raises(idembarrier.SchemaError, match="one records table per schema"):
        await idembarrier.upgrade(empty.engine, table="other_keys")


async def test_records_finished_before_0003_get_both_horizons(empty_pg_or_sqlite: Empty) -> None:
    """0003 turns an old record's expiry into its response horizon and keeps the record 30 days from completion."""
    empty = empty_pg_or_sqlite
    await run_command(empty.engine, "upgrade", "0002")
    pg = empty.engine.dialect.name == "postgresql"
    token = "gen_random_uuid()" if pg else "lower(hex(randomblob(16)))"
    old = "now() - interval '1 day'" if pg else "datetime('now', '-1 day')"
    expiry = "now() + interval '6 days'" if pg else "datetime('now', '+6 days')"
    null = "'null'::bytea" if pg else "X'6e756c6c'"
    async with empty.engine.begin() as conn:
        await conn.exec_driver_sql(
            f"""INSERT INTO idempotency_keys (scope, key, status, token, response, completed_at, expires_at)
                VALUES ('s', 'k', 'COMPLETED', {token}, {null}, {old}, {expiry})"""
        )
    await idembarrier.upgrade(empty.engine)
    days = (
        "extract(epoch FROM response_expires_at - completed_at) / 86400, "
        "extract(epoch FROM expires_at - completed_at) / 86400"
        if pg
        else "julianday(response_expires_at) - julianday(completed_at), julianday(expires_at) - julianday(completed_at)"
    )
    async with empty.engine.connect() as conn:
        row: Any = (await conn.exec_driver_sql(f"SELECT {days} FROM idempotency_keys")).one()
    assert (round(float(row[0])), round(float(row[1]))) == (7, 30)


async def test_a_message_pending_before_0005_is_relayed_with_its_version_1_id(empty_pg_or_sqlite: Empty) -> None:
    """An outbox row written under 0004 upgrades unrefused and unparked, and relays with its old id and headers."""
    empty = empty_pg_or_sqlite
    from idembarrier._outbox import encode_headers
    from idembarrier.kafka import MESSAGE_ID_HEADER, OutboxRelay
    from tests.test_outbox import Collecting

    await run_command(empty.engine, "upgrade", "0004")
    headers = encode_headers([(MESSAGE_ID_HEADER, b"msg-v1"), ("idempotency-key", b"k")])
    async with empty.engine.begin() as conn:
        await conn.execute(
            text(
                """INSERT INTO idempotency_keys_outbox
                       (message_id, topic, key, value, headers, scope, record_key, position)
                   VALUES ('msg-v1', 'orders', NULL, :value, :headers, 's', 'k', 0)"""
            ),
            {"value": b"v", "headers": headers},
        )
    await idembarrier.upgrade(empty.engine)
    publisher = Collecting()
    relay = OutboxRelay(idembarrier.Barrier(async_sessionmaker(empty.engine)), publisher)
    assert await relay.relay_once() == 1
    (message,) = publisher.messages
    assert (message.message_id, message.headers[0]) == ("msg-v1", (MESSAGE_ID_HEADER, b"msg-v1"))
