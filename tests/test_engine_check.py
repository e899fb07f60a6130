"""``idembarrier engine-check URL`` on every engine this machine runs: what it reports is what each one does.

PostgreSQL directly (both drivers) and through PgBouncer in transaction mode, SQLite, and MariaDB (on
127.0.0.1:3306, root without a password: each test its own database). The expectations are the behaviours
measured by hand on these servers (issue 12): MariaDB's default collation makes 'Key-A', 'key-a' and
'Key-A ' one key, its transactions are REPEATABLE READ and GET_LOCK survives ROLLBACK; a pooler takes
LISTEN and session state away and nothing else.
"""

from __future__ import annotations

import json
import socket
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests import _galera
from tests._cli import run_async
from tests._pgbouncer import pgbouncer
from tests.helpers import require

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from tests.conftest import Database

REQUIRED = ("exact_keys", "duplicate_waits", "read_committed", "clock_advances")
MARIADB = "mysql+aiomysql://root@127.0.0.1:3306"


async def engine_check(capfd: pytest.CaptureFixture[str], url: str) -> tuple[int, dict[str, Any]]:
    """Run the command with ``--json``; return its exit status and the checks by name (holds, required)."""
    done = await run_async(capfd, "engine-check", url, "--json")
    report = json.loads(done.out)
    assert report["passed"] == (done.status == 0)
    checks = {c["name"]: (c["holds"], c["required"]) for c in report["checks"]}
    return done.status, {"supported": report["supported"], **checks}


async def tables(url: str) -> set[str]:
    """The tables of the database at ``url`` (the check must leave none of its own behind)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: set(sync.dialect.get_table_names(sync)))
    finally:
        await engine.dispose()
    return {str(name) for name in names}


@pytest.fixture
async def mariadb() -> AsyncIterator[str]:
    """A database of its own on the machine's MariaDB; fails under CI (skipped elsewhere) when none answers."""
    try:
        socket.create_connection(("127.0.0.1", 3306), timeout=1).close()
    except OSError as exc:
        require(False, f"MariaDB on 127.0.0.1:3306 does not answer: {exc}")
    name = f"idembarrier_check_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(MARIADB, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f"CREATE DATABASE {name}"))
        yield f"{MARIADB}/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        await admin.dispose()


@pytest.fixture(scope="session")
def galera_cluster() -> _galera.Cluster:
    """The session's two-node Galera cluster (`tests._galera`); fails under CI, skipped elsewhere, without it."""
    return _galera.shared()


@pytest.fixture
def galera(galera_cluster: _galera.Cluster) -> Iterator[str]:
    """A database of its own on the Galera cluster, named by node 1's URL."""
    cluster = galera_cluster
    name = f"idembarrier_check_{uuid.uuid4().hex[:12]}"
    cluster.nodes[0].sql(f"CREATE DATABASE {name}")  # replicated to every node before it returns (TOI)
    try:
        yield cluster.nodes[0].url(name)
    finally:
        cluster.nodes[0].sql(f"DROP DATABASE IF EXISTS {name}")


@pytest.mark.parametrize("pg_db", ["asyncpg", "psycopg"], indirect=True)
async def test_postgresql_keeps_every_guarantee(pg_db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """Directly, every check holds on both drivers; exit 0; the check's table is gone afterwards."""
    before = await tables(pg_db.url)
    status, checks = await engine_check(capfd, pg_db.url)
    assert status == 0
    assert checks == {
        "supported": True,
        "exact_keys": (True, True),
        "duplicate_waits": (True, True),
        "savepoint_releases": (True, True),
        "advisory_locks": (True, True),
        "listen_notify": (True, False),
        "session_state": (True, False),
        "read_committed": (True, True),
        "clock_advances": (True, True),
        "single_primary": (None, False),
        "commit_certifies": (None, False),
    }
    assert await tables(pg_db.url) == before


@pytest.mark.parametrize("pg_db", ["asyncpg", "psycopg"], indirect=True)
async def test_a_transaction_pooler_loses_listen_and_session_state_only(
    pg_db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """Through PgBouncer (transaction mode): no NOTIFY, no session of one's own; the rest holds; exit 0."""
    with pgbouncer(make_url(pg_db.url)) as through:
        status, checks = await engine_check(capfd, through.render_as_string(hide_password=False))
    assert status == 0
    assert checks["listen_notify"] == (False, False)
    assert checks["session_state"] == (False, False)
    assert {name: checks[name] for name in (*REQUIRED, "savepoint_releases", "advisory_locks")} == dict.fromkeys(
        (*REQUIRED, "savepoint_releases", "advisory_locks"), (True, True)
    )


async def test_sqlite_serializes_writers(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """SQLite: keys exact, a second writer waits and times out, the rest does not apply; exit 0."""
    status, checks = await engine_check(capfd, f"sqlite+aiosqlite:///{tmp_path / 'check.db'}")
    assert status == 0
    assert checks["exact_keys"] == checks["duplicate_waits"] == checks["clock_advances"] == (True, True)
    for name in ("savepoint_releases", "advisory_locks", "listen_notify", "session_state", "read_committed"):
        assert checks[name][0] is None, name


async def test_mariadb_is_reported_with_the_hazards_measured_on_it(
    mariadb: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """MariaDB's defaults: keys folded by collation, REPEATABLE READ, session-scoped GET_LOCK: exit 1."""
    status, checks = await engine_check(capfd, mariadb)
    assert status == 1
    assert checks["supported"] is True  # the dialect is; these defaults are what its migrations work around
    assert checks["exact_keys"] == (False, True)
    assert checks["read_committed"] == (False, True)
    assert checks["advisory_locks"] == (False, True)
    assert checks["duplicate_waits"] == checks["savepoint_releases"] == checks["clock_advances"] == (True, True)
    assert checks["single_primary"] == (True, False)  # not a Galera node
    assert checks["commit_certifies"] == (None, False)
    assert await tables(mariadb) == set()


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
async def test_a_galera_cluster_is_reported_as_multi_primary_with_certified_commits(
    galera: str, driver: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """On a Galera node, measured against the other node: locks do not reach it, its duplicate loses at COMMIT.

    single_primary does not hold (informative: GET_LOCK and SKIP LOCKED seen from the other node); commit_certifies
    holds and is required; the rest is what MariaDB's defaults give on one node. Nothing is left behind.
    """
    url = galera.replace("mysql+aiomysql", f"mysql+{driver}")
    status, checks = await engine_check(capfd, url)
    assert checks["single_primary"] == (False, False)
    assert checks["commit_certifies"] == (True, True)
    assert checks["duplicate_waits"] == checks["savepoint_releases"] == checks["clock_advances"] == (True, True)
    assert checks["listen_notify"][0] is checks["session_state"][0] is None
    report = json.loads((await run_async(capfd, "engine-check", url, "--json")).out)
    details = {c["name"]: c["detail"] for c in report["checks"]}
    assert "GET_LOCK granted on both nodes" in details["single_primary"]
    assert "SKIP LOCKED on the other node returned the row this one locks" in details["single_primary"]
    assert "1213 (40001)" in details["commit_certifies"]
    assert status == 1  # MariaDB's defaults on each node: keys folded by collation, REPEATABLE READ, GET_LOCK
    assert checks["exact_keys"] == checks["read_committed"] == checks["advisory_locks"] == (False, True)
    assert await tables(url) == set()


async def test_the_text_report_names_each_check(pg_db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """Without --json: one line per check and the verdict."""
    done = await run_async(capfd, "engine-check", pg_db.url)
    assert done.status == 0
    lines = done.out.splitlines()
    assert lines[0].endswith(": supported")
    assert len(lines) == 12
    assert lines[-1] == "every guarantee the barrier needs holds"
    assert "postgres@" in lines[0]


@pytest.mark.parametrize(
    ("url", "status"),
    [("not a url", 2), ("oracle+oracledb://u@h/d", 2), ("postgresql+asyncpg://postgres@127.0.0.1:1/x", 3)],
)
async def test_bad_or_unreachable_urls_keep_the_exit_contract(
    url: str, status: int, capfd: pytest.CaptureFixture[str]
) -> None:
    """A URL that is not one, or names a database it does not know: exit 2; nothing answers: exit 3; one line."""
    done = await run_async(capfd, "engine-check", url)
    assert done.status == status
    assert done.line.startswith("idembarrier: ")
