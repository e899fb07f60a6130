"""engine-check on a Galera cluster (MariaDB multi-primary): what holds between nodes, measured on two of them.

A Galera node certifies each transaction's writes against the others' at COMMIT instead of locking rows
cluster-wide: two nodes both accept an uncommitted duplicate of a key, both bodies run, and the second COMMIT
is refused with error 1213 (SQLSTATE 40001), which the barrier counts as a lost race. Row locks, ``GET_LOCK``
and ``SKIP LOCKED`` hold on one node only. The node named by the URL lists every node's client address
(``wsrep_incoming_addresses``); the checks open the same account and database on another of them, with
``wsrep_sync_wait`` so that node has applied what committed first.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import NullPool, text

from .._errors import mysql_code

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["Galera", "certified_commits", "cluster_of", "cross_node_locks"]

_CERTIFICATION_FAILURE = 1213  # ER_LOCK_DEADLOCK, SQLSTATE 40001: Galera's refusal of a conflicting COMMIT
_SYNC_WAIT = "SET SESSION wsrep_sync_wait = 15"  # reads and writes wait until this node applied what committed


@dataclass(frozen=True)
class Galera:
    """The Galera cluster a node belongs to: its size and the other nodes' client addresses."""

    size: int
    others: tuple[str, ...]


async def cluster_of(engine: AsyncEngine) -> Galera | None:
    """The node's Galera cluster, or ``None`` when replication is off (``wsrep_on``) or it is not MariaDB."""
    async with engine.connect() as conn:
        on = (await conn.execute(text("SHOW VARIABLES LIKE 'wsrep_on'"))).first()
        if on is None or str(on[1]).upper() != "ON":
            return None
        wanted = "('wsrep_cluster_size', 'wsrep_incoming_addresses')"
        rows = await conn.execute(text(f"SHOW GLOBAL STATUS WHERE Variable_name IN {wanted}"))
        status = {str(name): str(value) for name, value in rows}
        mine = (await conn.execute(text("SHOW VARIABLES LIKE 'wsrep_node_incoming_address'"))).first()
    url = engine.url
    ours = {f"{url.host}:{url.port or 3306}", str(mine[1]) if mine is not None else ""}
    addresses = [a.strip() for a in status.get("wsrep_incoming_addresses", "").split(",") if a.strip()]
    return Galera(int(status.get("wsrep_cluster_size", "0") or 0), tuple(a for a in addresses if a not in ours))


def _other_url(url: URL, address: str) -> URL:
    host, _, port = address.rpartition(":")
    return url.set(host=host.strip("[]"), port=int(port))


async def _other_node(engine: AsyncEngine, galera: Galera) -> tuple[AsyncEngine, str] | None:
    """An engine on another node of the cluster (the URL's account and database), or ``None`` if none answers."""
    from sqlalchemy.ext.asyncio import create_async_engine

    for address in galera.others:
        other = create_async_engine(_other_url(engine.url, address), poolclass=NullPool)
        try:
            async with other.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:  # unreachable from here (another network, a firewall): try the next one
            await other.dispose()
            continue
        return other, address
    return None


async def _synced(conn: AsyncConnection) -> None:
    await conn.execute(text(_SYNC_WAIT))
    await conn.commit()  # ends the transaction SQLAlchemy began for it; the setting is the session's


async def certified_commits(engine: AsyncEngine, galera: Galera, table: str) -> tuple[bool | None, str]:
    """A duplicate of an uncommitted key on another node: it runs, and its COMMIT is refused (1213).

    Returns whether the loser was refused (``None``: no other node could be reached) and what was seen.
    """
    found = await _other_node(engine, galera)
    if found is None:
        return None, f"not measured: no other node answered at {', '.join(galera.others) or 'no address'}"
    other, address = found
    refused: int | None = None
    step = "its INSERT"  # a transaction of the other node's can be aborted before its COMMIT (a brute-force abort)
    try:
        async with engine.connect() as here, other.connect() as there:
            await _synced(there)
            await here.begin()
            # The holder's claim: an uncommitted row of the key on this node.
            await here.execute(text(f"INSERT INTO {table} (k) VALUES ('cert')"))
            await there.begin()
            started = time.monotonic()
            try:
                # The duplicate's claim on the other node: no row lock reaches it, so it does not wait.
                await there.execute(text(f"INSERT INTO {table} (k) VALUES ('cert')"))
                waited = time.monotonic() - started
                await here.commit()
                step = "its COMMIT"
                await there.commit()  # certified after the holder's COMMIT: refused, or both would commit
            except Exception as exc:
                refused = mysql_code(exc)
                waited = time.monotonic() - started
                await there.rollback()
                if here.in_transaction():
                    await here.rollback()
        async with engine.connect() as conn:
            await _synced(conn)
            rows = (await conn.execute(text(f"SELECT count(*) FROM {table} WHERE k = 'cert'"))).scalar_one()
            await conn.execute(text(f"DELETE FROM {table}"))
            await conn.commit()
    finally:
        await other.dispose()
    if refused == _CERTIFICATION_FAILURE and rows == 1:
        return True, (
            f"a duplicate on {address} did not wait ({waited:.2f} s) and ran; {step} was refused with "
            "1213 (40001) once the holder committed: a lost race for the barrier"
        )
    if refused is not None:
        return False, f"the duplicate on {address} failed with error {refused} instead of 1213; {rows} row(s) kept"
    return False, f"both nodes committed the key ({rows} row(s)): certification did not refuse the duplicate"


async def cross_node_locks(engine: AsyncEngine, galera: Galera, table: str) -> str:
    """What another node sees of this node's locks: ``GET_LOCK`` and a row locked ``FOR UPDATE``."""
    found = await _other_node(engine, galera)
    if found is None:
        return "not measured (no other node answered)"
    other, address = found
    name = f"idembarrier_engine_check_{uuid.uuid4().hex[:12]}"
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"INSERT INTO {table} (k) VALUES ('locked')"))
        async with engine.connect() as here, other.connect() as there:
            await _synced(there)
            granted_here = (await here.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": name})).scalar_one()
            granted_there = (await there.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": name})).scalar_one()
            await here.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name})
            await there.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name})
            await here.commit()
            await there.commit()
            await here.begin()
            await here.execute(text(f"SELECT k FROM {table} WHERE k = 'locked' FOR UPDATE"))
            await there.begin()
            skipped = (
                await there.execute(text(f"SELECT k FROM {table} WHERE k = 'locked' FOR UPDATE SKIP LOCKED"))
            ).first() is None
            await there.rollback()
            await here.rollback()
        async with engine.begin() as conn:
            await conn.execute(text(f"DELETE FROM {table}"))
    finally:
        await other.dispose()
    seen = [
        "GET_LOCK granted on both nodes" if granted_here == granted_there == 1 else "GET_LOCK exclusive across nodes",
        "SKIP LOCKED on the other node returned the row this one locks"
        if not skipped
        else "SKIP LOCKED on the other node skipped the row this one locks",
    ]
    return f"measured with {address}: {', '.join(seen)}"
