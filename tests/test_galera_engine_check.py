"""engine-check's cross-node measurements (`idembarrier.cli._engine_galera`) against addresses that are not
another node of the cluster: none, one that refuses, a server outside the cluster, and the node itself.

The measurement against the other node of a real cluster, through the command, is in `tests.test_engine_check`.
"""

from __future__ import annotations

import socket
import uuid
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from idembarrier.cli._engine_galera import Galera, certified_commits, cross_node_locks
from tests.test_galera import galera_cluster

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests import _galera

__all__ = ["galera_cluster"]  # a fixture, shared with test_galera


MARIADB = "mysql+aiomysql://root@127.0.0.1:3306"
"""The machine's own MariaDB: a server outside the cluster."""


@pytest.fixture
async def checked(galera_cluster: _galera.Cluster) -> AsyncIterator[tuple[AsyncEngine, str]]:
    """An engine on node 1 and the name of a table ``(k PRIMARY KEY)`` of the same database on node 1 (hence
    node 2) and on the machine's MariaDB, as engine-check creates it; all dropped afterwards."""
    name, table = f"idembarrier_g_{uuid.uuid4().hex[:12]}", "idembarrier_engine_check_t"
    outside = create_async_engine(MARIADB, isolation_level="AUTOCOMMIT")
    node = galera_cluster.nodes[0]
    engine = create_async_engine(node.url(name))
    try:
        for statement in (f"CREATE DATABASE {name}", f"CREATE TABLE {name}.{table} (k VARCHAR(64) PRIMARY KEY)"):
            node.sql(statement)
            async with outside.connect() as conn:
                await conn.execute(text(statement))
        yield engine, table
    finally:
        await engine.dispose()
        node.sql(f"DROP DATABASE IF EXISTS {name}")
        async with outside.connect() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        await outside.dispose()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_engine_check_measures_nothing_without_another_node_that_answers(
    checked: tuple[AsyncEngine, str], galera_cluster: _galera.Cluster
) -> None:
    """No other address, or only ones that refuse: both measurements say "not measured"; an address that
    refuses is skipped for the next one, node 2, where certification is measured."""
    engine, table = checked
    nobody = Galera(2, ())  # the status listed no address but this node's
    assert await certified_commits(engine, nobody, table) == (
        None,
        "not measured: no other node answered at no address",
    )
    assert await cross_node_locks(engine, nobody, table) == "not measured (no other node answered)"
    dead = f"127.0.0.1:{closed_port()}"
    alone = Galera(2, (dead,))
    assert await certified_commits(engine, alone, table) == (None, f"not measured: no other node answered at {dead}")
    assert await cross_node_locks(engine, alone, table) == "not measured (no other node answered)"
    second = f"127.0.0.1:{galera_cluster.nodes[1].port}"
    holds, detail = await certified_commits(engine, Galera(2, (dead, second)), table)
    assert holds is True
    assert f"a duplicate on {second} did not wait" in detail


async def test_engine_check_tells_a_server_outside_the_cluster_from_a_certifying_node(
    checked: tuple[AsyncEngine, str],
) -> None:
    """Measured against a server that is not in the cluster: an empty table there lets both commit the key
    (certification did not refuse); a key already there fails the duplicate with 1062, not 1213, and the
    holder's claim is rolled back. Neither holds."""
    engine, table = checked
    outside = Galera(2, ("127.0.0.1:3306",))
    assert await certified_commits(engine, outside, table) == (
        False,
        "both nodes committed the key (1 row(s)): certification did not refuse the duplicate",
    )
    assert await certified_commits(engine, outside, table) == (
        False,
        "the duplicate on 127.0.0.1:3306 failed with error 1062 instead of 1213; 0 row(s) kept",
    )


async def test_engine_check_reads_the_node_itself_as_one_primary(
    checked: tuple[AsyncEngine, str], galera_cluster: _galera.Cluster
) -> None:
    """Measured against node 1's own address: GET_LOCK is exclusive and SKIP LOCKED skips the locked row, which
    is what one primary does (the other node's view, in the cluster test of test_engine_check, is the opposite)."""
    engine, table = checked
    itself = f"127.0.0.1:{galera_cluster.nodes[0].port}"
    assert await cross_node_locks(engine, Galera(2, (itself,)), table) == (
        f"measured with {itself}: GET_LOCK exclusive across nodes, "
        "SKIP LOCKED on the other node skipped the row this one locks"
    )
