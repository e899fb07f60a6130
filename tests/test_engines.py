"""Only engines whose guarantees hold: in-memory SQLite and unsupported drivers are refused before any DDL."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import inspect
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import idembarrier
from idembarrier import Barrier, ConfigurationError
from idembarrier._engines import check_url
from idembarrier.cli._engine import create_engine

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy import Connection

IN_MEMORY = [
    "sqlite+aiosqlite://",
    "sqlite+aiosqlite:///:memory:",
    "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true",
    "sqlite+aiosqlite:///file:payments?mode=memory&cache=shared&uri=true",
]


class ForkedAiosqliteDialect(SQLiteDialect_aiosqlite):
    """An async driver idembarrier was never tested with: SQLite through a renamed aiosqlite."""

    driver = "forked_aiosqlite"


registry.register("sqlite.forked_aiosqlite", __name__, "ForkedAiosqliteDialect")


def _tables(connection: Connection) -> list[str]:
    return inspect(connection).get_table_names()


@pytest.mark.parametrize("url", IN_MEMORY)
def test_create_sqlite_engine_refuses_an_in_memory_database(url: str) -> None:
    """An in-memory SQLite URL raises ConfigurationError that names the fix: a file URL."""
    with pytest.raises(ConfigurationError, match=r"in-memory.*sqlite\+aiosqlite:///"):
        idembarrier.create_sqlite_engine(url)


@pytest.mark.parametrize("url", IN_MEMORY[:2])
async def test_upgrade_refuses_an_in_memory_engine_before_any_ddl(url: str) -> None:
    """upgrade() on an in-memory engine the caller made raises ConfigurationError and creates no table."""
    engine = create_async_engine(url)
    try:
        with pytest.raises(ConfigurationError, match="in-memory"):
            await idembarrier.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == []
    finally:
        await engine.dispose()


async def test_a_unit_of_work_refuses_an_in_memory_engine() -> None:
    """A barrier over an in-memory engine raises ConfigurationError at its first unit of work."""
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        with pytest.raises(ConfigurationError, match="in-memory"):
            async with Barrier(async_sessionmaker(engine)).unit_of_work("k", scope="s") as uow:
                uow.complete(None)  # pragma: no cover - never entered
    finally:
        await engine.dispose()


async def test_upgrade_refuses_an_unsupported_driver_before_any_ddl(tmp_path: Path) -> None:
    """upgrade() on a driver it does not support raises ConfigurationError naming the supported ones."""
    engine = create_async_engine(f"sqlite+forked_aiosqlite:///{tmp_path / 'app.db'}")
    try:
        with pytest.raises(ConfigurationError, match=r"mysql\+aiomysql \(MariaDB\) and sqlite"):
            await idembarrier.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == []
    finally:
        await engine.dispose()


async def test_a_unit_of_work_refuses_an_unsupported_driver(tmp_path: Path) -> None:
    """A barrier over an unsupported driver raises ConfigurationError, not a storage failure."""
    engine = create_async_engine(f"sqlite+forked_aiosqlite:///{tmp_path / 'app.db'}")
    try:
        with pytest.raises(ConfigurationError, match="forked_aiosqlite"):
            async with Barrier(async_sessionmaker(engine), check_schema=False).unit_of_work("k", scope="s"):
                pass  # pragma: no cover - never entered
    finally:
        await engine.dispose()


async def test_a_refused_driver_is_refused_at_every_unit_of_work(tmp_path: Path) -> None:
    """The refusal is not remembered as a resolution: a second unit of work on the engine is refused too."""
    engine = create_async_engine(f"sqlite+forked_aiosqlite:///{tmp_path / 'app.db'}")
    barrier = Barrier(async_sessionmaker(engine), check_schema=False)
    try:
        for _ in range(2):
            with pytest.raises(ConfigurationError, match="forked_aiosqlite"):
                async with barrier.unit_of_work("k", scope="s"):
                    pass  # pragma: no cover - never entered
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("mysql+pymysql://root@127.0.0.1/app", "mysql+pymysql"),
        ("mysql://root@127.0.0.1/app", "mysql+mysqldb"),
        ("postgresql+psycopg2://postgres@127.0.0.1/test", "postgresql+psycopg2"),
        ("postgresql://postgres@127.0.0.1/test", "postgresql+psycopg"),
        ("sqlite:///app.db", "sqlite+pysqlite"),
    ],
)
def test_check_url_names_what_is_supported(url: str, named: str) -> None:
    """A URL for another database or driver, or a synchronous one, raises ConfigurationError naming both."""
    with pytest.raises(
        ConfigurationError, match="supports postgresql\\+asyncpg, postgresql\\+psycopg, mysql\\+asyncmy"
    ) as caught:
        check_url(url)
    assert named in str(caught.value)


def test_a_url_without_a_driver_is_called_synchronous() -> None:
    """A URL with no ``+driver`` says that it picks SQLAlchemy's synchronous default driver."""
    with pytest.raises(ConfigurationError, match="synchronous"):
        check_url("postgresql://postgres@127.0.0.1/test")


def test_a_url_that_does_not_parse_is_a_configuration_error() -> None:
    """Text SQLAlchemy cannot parse as a URL, or an unknown dialect, raises ConfigurationError."""
    for url in ("nonsense", "nosuchdb://host/db"):
        with pytest.raises(ConfigurationError, match="database URL"):
            check_url(url)


def test_create_engine_refuses_a_missing_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the supported driver is not installed, ConfigurationError names the extra to install."""
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(ConfigurationError, match=r"idembarrier\[postgres\]"):
        create_engine("postgresql+asyncpg://postgres@127.0.0.1/test")


def test_create_sqlite_engine_refuses_another_database() -> None:
    """create_sqlite_engine is for SQLite only: a PostgreSQL URL is a ConfigurationError naming the fix."""
    with pytest.raises(ConfigurationError, match="create_async_engine"):
        idembarrier.create_sqlite_engine("postgresql+asyncpg://app@db/shop")
