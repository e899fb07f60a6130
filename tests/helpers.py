"""Plain helpers the test modules share: keys, the quickstart's payment, the body's own failure, a poller.

Fixtures live in `tests.conftest`; what is here is ordinary functions and classes, imported by name.
"""

from __future__ import annotations

import os
import re
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests import _postgres_server
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.engine import URL

    from idembarrier import JSON, Barrier, OnConflict
    from tests.conftest import Database


CI_VARIABLE = "IDEMBARRIER_CI"
"""Set by `.ci/run`: a service a test needs and cannot find fails the test instead of skipping it."""


def require(available: bool, reason: str) -> None:
    """Go on if ``available``; else fail the test under CI, and skip it with ``reason`` (listed) elsewhere."""
    if available:
        return
    if os.environ.get(CI_VARIABLE):
        pytest.fail(f"{reason} (required under {CI_VARIABLE})", pytrace=False)
    pytest.skip(reason)


class Boom(Exception):
    """The body's own failure, which idembarrier must let through unchanged."""


def new_key() -> str:
    """A key no other test uses."""
    return f"order-{uuid.uuid4()}"


async def pay(
    barrier: Barrier,
    key: str,
    *,
    amount: int = 100,
    scope: str = "payments",
    fingerprint: object = None,
    on_conflict: OnConflict | None = None,
) -> JSON:
    """The quickstart's body: one payment row, its id and amount as the response; a replay returns it."""
    async with barrier.unit_of_work(key, scope=scope, fingerprint=fingerprint, on_conflict=on_conflict) as uow:
        if uow.replayed:
            return uow.response
        payment = Payment(key=key, amount=amount)
        uow.session.add(payment)
        await uow.session.flush()
        uow.complete({"payment_id": payment.id, "amount": amount})
    return uow.response


LOCK_WAITERS = text(
    "SELECT pid FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid() ORDER BY pid"
)

MARIADB_CONNECTIONS = text(
    "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND ID <> CONNECTION_ID()"
)
"""The other connections to this MariaDB database (PROCESSLIST is read live, at each query)."""

INNODB_STATUS = "SET STATEMENT character_set_results = binary FOR SHOW ENGINE INNODB STATUS"
"""InnoDB's monitor as bytes: it prints locked records' raw bytes, which need not decode (a fingerprint)."""

MARIADB_THREAD = re.compile(r"^(?:MariaDB|MySQL) thread id (\d+),", re.MULTILINE)


def innodb_lock_waiters(status: str) -> set[int]:
    """The connection ids that ``status``, the text of ``SHOW ENGINE INNODB STATUS``, shows waiting on a lock.

    Not information_schema.INNODB_TRX: InnoDB refills that view's cache only after 100 ms without a read
    (``CACHE_MIN_IDLE_TIME_NS`` in trx0i_s.cc), so a poll faster than that, or any other reader on the
    server, keeps showing the snapshot of its first read, taken before the waits began. The monitor's list of
    transactions is printed under the lock system's latch at each call.
    """
    waiting = set()
    for block in status.split("\n---TRANSACTION ")[1:]:  # one per transaction; the last runs on to FILE I/O
        if "\n------- TRX HAS BEEN WAITING " in block and (thread := MARIADB_THREAD.search(block)):
            waiting.add(int(thread[1]))
    return waiting


async def lock_waiters(db: Database, n: int = 1) -> list[int]:
    """Return the pids of ``db``'s backends waiting on a lock, once there are ``n`` or more.

    On PostgreSQL the backends' pids, from pg_stat_activity; on MariaDB the connection ids of this database
    whose InnoDB transaction waits on a lock (`innodb_lock_waiters`). Raises TimeoutError when fewer than ``n``
    wait after 20 s; a caller wanting less wraps it in `fail_after`.
    """
    with anyio.fail_after(20):
        while True:
            async with db.engine.connect() as conn:
                if db.dialect == "mysql":
                    status = (await conn.exec_driver_sql(INNODB_STATUS)).scalars(2).one().decode(errors="replace")
                    ours = {int(pid) for pid in (await conn.execute(MARIADB_CONNECTIONS)).scalars()}
                    pids = sorted(ours & innodb_lock_waiters(status))
                else:
                    pids = [int(pid) for pid in (await conn.execute(LOCK_WAITERS)).scalars()]
            if len(pids) >= n:
                return pids
            await anyio.sleep(0.005)  # the wait happens inside the server, which no event reaches: poll it


def admin_url() -> URL:
    """The session's PostgreSQL server, as `tests.conftest` found or started it (it exports the URL)."""
    return make_url(os.environ.get(_postgres_server.URL_VARIABLE, _postgres_server.DEFAULT_URL))


async def admin(sql: str) -> None:
    """Run one statement on the server's maintenance database, outside a transaction (CREATE DATABASE…)."""
    engine = create_async_engine(admin_url(), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(sql)
    finally:
        await engine.dispose()


@asynccontextmanager
async def fresh_database(prefix: str = "idembarrier_t", *, template: str | None = None) -> AsyncIterator[URL]:
    """A new PostgreSQL database, empty or cloned from ``template``, dropped on the way out; yield its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield admin_url().set(database=name)
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
