"""Fixtures: a migrated PostgreSQL template database cloned per test, a migrated SQLite file per test, and a
MariaDB database per test whose tables are copied from one migrated once per session.

The PostgreSQL server comes from IDEMBARRIER_TEST_DATABASE_URL (default: the local server, database
``test``). Where it does not answer, or IDEMBARRIER_TEST_EMBEDDED_POSTGRES=1, the session starts an embedded
one instead (see `tests._postgres_server`); no test is skipped for want of a server.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

import idembarrier
from idembarrier._errors import mysql_code
from idembarrier._schema import VERSION_TABLE
from tests import _postgres_server
from tests.faultproxy import FaultProxy
from tests.models import Base, Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path
from typing import Any

ADMIN_URL = _postgres_server.session_url()
TEMPLATE = f"idembarrier_template_{os.getpid()}"
MARIADB_URL = make_url(os.environ.get("IDEMBARRIER_TEST_MARIADB_URL", "mysql+asyncmy://root@127.0.0.1:3306/test"))
"""The MariaDB server of the tests (root with an empty password on the local one); databases are made per test."""


def pytest_report_header() -> str:
    return _postgres_server.report_header()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # asyncpg runs on asyncio only


async def _admin(sql: str) -> None:
    engine = create_async_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(sql)
    finally:
        await engine.dispose()


async def prepare(engine: AsyncEngine) -> None:
    """Install idembarrier's schema and the business tables on ``engine``."""
    await idembarrier.upgrade(engine)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


@pytest.fixture(scope="session")
async def pg_template() -> AsyncIterator[str]:
    """A database migrated once per session, to be cloned by each test."""
    try:
        await _admin(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
    except OSError as exc:  # pragma: no cover - the server is part of the test environment
        pytest.fail(f"PostgreSQL at {ADMIN_URL.render_as_string()} does not answer: {exc}", pytrace=False)
    await _admin(f'CREATE DATABASE "{TEMPLATE}"')
    engine = create_async_engine(ADMIN_URL.set(database=TEMPLATE))
    try:
        await prepare(engine)
    finally:
        await engine.dispose()
    yield TEMPLATE
    await _admin(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')


@dataclass
class Database:
    """A database for one test: its URL, engine and sessionmaker."""

    url: str
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def payments(self, key: str | None = None) -> int:
        """Count the business rows, all of them or those written for ``key``."""
        query = select(func.count()).select_from(Payment)
        if key is not None:
            query = query.where(Payment.key == key)
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).scalar_one()

    async def records(self, key: str | None = None) -> list[tuple[str, str, str]]:
        """Return (scope, key, status) of the records, all of them or those of ``key``."""
        column = self.engine.dialect.identifier_preparer.quote("key")  # a reserved word on MariaDB
        sql = f"SELECT scope, {column}, status FROM idempotency_keys"
        async with self.engine.connect() as conn:
            rows: list[Any] = list((await conn.exec_driver_sql(sql)).all())
        return sorted((str(r[0]), str(r[1]), str(r[2])) for r in rows if key is None or r[1] == key)


PSYCOPG_MODULES = frozenset(
    f"tests.{name}"
    for name in (
        "test_unit_of_work",
        "test_concurrency",
        "test_lease",
        "test_retention",
        "test_outbox",
        "test_crash",
        "test_replay_memory",
    )
)
"""The core behavioural modules: their PostgreSQL tests run through psycopg 3 as well as asyncpg."""

MARIADB_MODULES = PSYCOPG_MODULES
"""The modules whose `db` tests run on MariaDB too (through asyncmy); a test that cannot apply there says why
with `tests.helpers.not_on_mariadb`."""

AIOMYSQL_MODULES = frozenset(f"tests.{name}" for name in ("test_unit_of_work", "test_outbox", "test_replay_memory"))
"""Of those, the modules that run on MariaDB through aiomysql as well."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`db` runs on both engines; in `PSYCOPG_MODULES` on psycopg and MariaDB too, and a test on `pg_db` on both
    PostgreSQL drivers."""
    core = metafunc.module.__name__ in PSYCOPG_MODULES
    if "db" in metafunc.fixturenames:
        engines = ["postgresql", "psycopg", "sqlite"] if core else ["postgresql", "sqlite"]
        if metafunc.module.__name__ in MARIADB_MODULES:
            engines.append("mariadb")
        if metafunc.module.__name__ in AIOMYSQL_MODULES:
            engines.append("aiomysql")
        metafunc.parametrize("db", engines, indirect=True)
    elif core and "pg_db" in metafunc.fixturenames and not _parametrizes(metafunc, "pg_db"):
        metafunc.parametrize("pg_db", ["asyncpg", "psycopg"], indirect=True)


def _parametrizes(metafunc: pytest.Metafunc, name: str) -> bool:
    """Whether the test parametrizes ``name`` itself (a test of one driver's own behaviour)."""
    return any(name in str(mark.args[0]) for mark in metafunc.definition.iter_markers("parametrize"))


async def _pg_database(template: str, driver: str) -> AsyncIterator[Database]:
    name = f"idembarrier_t_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    url = ADMIN_URL.set(drivername=f"postgresql+{driver}", database=name)
    engine = create_async_engine(url, pool_size=20, max_overflow=220)
    try:
        yield Database(url.render_as_string(hide_password=False), engine, async_sessionmaker(engine))
    finally:
        await engine.dispose()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pg_db(request: pytest.FixtureRequest, pg_template: str) -> AsyncIterator[Database]:
    """A clone of the template, through asyncpg (or the driver a `pytest_generate_tests` parameter names)."""
    async for database in _pg_database(pg_template, getattr(request, "param", "asyncpg")):
        yield database


@pytest.fixture
async def psycopg_db(pg_template: str) -> AsyncIterator[Database]:
    """A clone of the template, through psycopg 3."""
    async for database in _pg_database(pg_template, "psycopg"):
        yield database


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    engine = idembarrier.create_sqlite_engine(url)
    await prepare(engine)
    try:
        yield Database(url, engine, async_sessionmaker(engine))
    finally:
        await engine.dispose()


async def _mariadb_admin(*statements: str) -> bool:
    """Run ``statements`` on the MariaDB server; False when it does not answer."""
    engine = create_async_engine(MARIADB_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for sql in statements:
                await conn.exec_driver_sql(sql)
    except OSError:
        return False
    except Exception as exc:
        if mysql_code(exc) == _CANNOT_CONNECT:
            return False
        raise
    finally:
        await engine.dispose()
    return True


MARIADB_TEMPLATE = f"idembarrier_mtemplate_{os.getpid()}"
_CANNOT_CONNECT = 2003  # CR_CONN_HOST_ERROR: nothing listens there


@pytest.fixture(scope="session")
async def mariadb_template() -> AsyncIterator[list[str]]:
    """A MariaDB database migrated once per session; yields its tables, which each test's database copies."""
    from tests.helpers import require

    available = await _mariadb_admin(
        # The storms open hundreds of connections (pools of up to 240), as on PostgreSQL; MariaDB's default is 151.
        "SET GLOBAL max_connections = GREATEST(@@GLOBAL.max_connections, 1000)",
        f"DROP DATABASE IF EXISTS `{MARIADB_TEMPLATE}`",
        f"CREATE DATABASE `{MARIADB_TEMPLATE}`",
    )
    require(available, f"MariaDB at {MARIADB_URL.render_as_string()} does not answer")
    engine = create_async_engine(MARIADB_URL.set(database=MARIADB_TEMPLATE))
    try:
        await prepare(engine)
        async with engine.connect() as conn:
            tables = [str(name) for (name,) in await conn.exec_driver_sql("SHOW TABLES")]
    finally:
        await engine.dispose()
    yield tables
    await _mariadb_admin(f"DROP DATABASE IF EXISTS `{MARIADB_TEMPLATE}`")


async def _mariadb_database(tables: list[str], driver: str) -> AsyncIterator[Database]:
    """A fresh database: the template's tables copied (CREATE TABLE … LIKE keeps indexes, checks, collations)."""
    name = f"idembarrier_t_{uuid.uuid4().hex[:12]}"
    await _mariadb_admin(
        f"CREATE DATABASE `{name}`",
        *(f"CREATE TABLE `{name}`.`{table}` LIKE `{MARIADB_TEMPLATE}`.`{table}`" for table in tables),
        f"INSERT INTO `{name}`.{VERSION_TABLE} SELECT * FROM `{MARIADB_TEMPLATE}`.{VERSION_TABLE}",
    )
    url = MARIADB_URL.set(drivername=f"mysql+{driver}", database=name)
    engine = create_async_engine(url, pool_size=20, max_overflow=220)
    try:
        yield Database(url.render_as_string(hide_password=False), engine, async_sessionmaker(engine))
    finally:
        await engine.dispose()
        await _mariadb_admin(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
async def mariadb_db(mariadb_template: list[str]) -> AsyncIterator[Database]:
    """A fresh MariaDB database through asyncmy, at head, with the business tables."""
    async for database in _mariadb_database(mariadb_template, "asyncmy"):
        yield database


@pytest.fixture
async def aiomysql_db(mariadb_template: list[str]) -> AsyncIterator[Database]:
    """A fresh MariaDB database through aiomysql."""
    async for database in _mariadb_database(mariadb_template, "aiomysql"):
        yield database


@pytest.fixture
def db(request: pytest.FixtureRequest) -> Database:
    """Each behavioural test runs on both engines (`pytest_generate_tests`; in `PSYCOPG_MODULES`, psycopg and
    MariaDB too)."""
    fixture = {
        "postgresql": "pg_db",
        "psycopg": "psycopg_db",
        "sqlite": "sqlite_db",
        "mariadb": "mariadb_db",
        "aiomysql": "aiomysql_db",
    }[request.param]
    database: Database = request.getfixturevalue(fixture)
    return database


@pytest.fixture
async def proxy(pg_db: Database) -> AsyncIterator[FaultProxy]:
    """A fault-injecting proxy in front of the test's PostgreSQL database (see `tests.faultproxy`)."""
    async with FaultProxy.for_url(pg_db.url) as running:
        yield running


@pytest.fixture
async def proxied(pg_db: Database, proxy: FaultProxy) -> AsyncIterator[AsyncEngine]:
    """An engine whose connections go through the proxy (a pool of 4)."""
    engine = create_async_engine(proxy.url(pg_db.url), pool_size=4, max_overflow=0)
    try:
        yield engine
    finally:
        await engine.dispose()
