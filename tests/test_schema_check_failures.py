"""The schema check's answers when the database, not the schema, is what fails."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import idembarrier
from idembarrier import ConnectionLostError
from idembarrier._migrate import check_schema_on

if TYPE_CHECKING:
    from tests.conftest import Database


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_server_that_refuses_connections_is_a_lost_connection(driver: str) -> None:
    """`check_schema` against a port nothing answers on raises `ConnectionLostError`, never the driver's error."""
    engine = create_async_engine(f"postgresql+{driver}://postgres@127.0.0.1:{closed_port()}/test")
    try:
        with pytest.raises(ConnectionLostError) as caught:
            await idembarrier.check_schema(engine)
    finally:
        await engine.dispose()
    assert caught.value.__cause__ is not None  # the driver's error stays reachable, chained


async def test_a_backend_terminated_under_the_check_is_a_lost_connection(pg_db: Database) -> None:
    """`check_schema_on` over a connection whose backend was terminated raises `ConnectionLostError`, not
    `SchemaError` (the schema is there; the connection is not)."""
    async with pg_db.engine.connect() as conn:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await conn.rollback()
        async with pg_db.engine.connect() as admin:
            ended = (await admin.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})).scalar()
        assert ended is True
        with pytest.raises(ConnectionLostError):
            await check_schema_on(conn)
