"""Leased work across real OS processes on PostgreSQL: a killed holder, a paused one, a heartbeat.

Each child holds a lease on a key, calls a fake payment gateway on loopback with the lease's downstream
key, and reports each step as a line on its stdout; the parent orders events by those lines and by the
database's clock, never by sleeping.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from sqlalchemy import text

from idembarrier import JSON, Barrier, KeyInProgressError, OnConflict, Record
from tests.helpers import new_key
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from anyio.abc import Process

    from idembarrier import Lease
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent
SCOPE = "charges"

# argv: database URL, gateway URL, key, lease seconds, heartbeat seconds ("-": none), mode.
# mode "charge": call the gateway, checkpoint the charge id, print "charged <id>";
# mode "hold": call nothing, print "leased <attempt>".
# Then wait for a line from the parent (the event loop, and so the heartbeat, keeps running) and finish
# the lease with one payment row, printing "finished"; an exception is printed by its class name instead.
# If the parent goes away, stdin reaches its end and the child leaves without finishing.
CHILD = """
import json, sys, urllib.request
from datetime import timedelta
import anyio
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from idembarrier import Barrier
from tests.models import Payment

def charge(gateway, downstream_key):
    request = urllib.request.Request(gateway, method="POST", headers={"Idempotency-Key": downstream_key})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)["charge_id"]

def say(*words):
    print(*words, flush=True)

async def main(url, gateway, key, lease, heartbeat, mode):
    engine = create_async_engine(url)
    barrier = Barrier(async_sessionmaker(engine))
    beat = None if heartbeat == "-" else float(heartbeat)
    try:
        async with barrier.leased(key, scope="charges", lease=timedelta(seconds=float(lease)), heartbeat=beat) as held:
            charge_id = None
            if mode == "charge":
                charge_id = await anyio.to_thread.run_sync(charge, gateway, held.downstream_key)
                await held.checkpoint("charged", {"charge_id": charge_id})
                say("charged", charge_id)
            else:
                say("leased", held.attempt)
            if not await anyio.to_thread.run_sync(sys.stdin.readline):
                raise SystemExit("the parent went away")
            async with held.finish() as uow:
                uow.session.add(Payment(key=key, amount=100))
                uow.complete({"charge_id": charge_id, "by": "child"})
        say("finished")
    except Exception as exc:
        say(type(exc).__name__)
    finally:
        await engine.dispose()

anyio.run(main, *sys.argv[1:])
"""


class FakeGateway:
    """A payment gateway that deduplicates by ``Idempotency-Key``: one charge per key, however often called."""

    def __init__(self) -> None:
        self.url = ""
        self.calls: Counter[str] = Counter()
        self.effects: Counter[str] = Counter()
        self._charges: dict[str, str] = {}
        self._lock = threading.Lock()

    def charge(self, key: str) -> str:
        """Count the call; charge only on a key's first call; return the key's charge id."""
        with self._lock:
            self.calls[key] += 1
            if key not in self._charges:
                self.effects[key] += 1
                self._charges[key] = f"ch_{uuid.uuid4().hex[:12]}"
            return self._charges[key]


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    """A `FakeGateway` serving HTTP on loopback from a thread, for children and the test alike."""
    fake = FakeGateway()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            key = self.headers.get("Idempotency-Key")
            if not key:
                self.send_error(400, "Idempotency-Key is required")
                return
            body = json.dumps({"charge_id": fake.charge(key)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the test output to the test's own

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/charges"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def charge(url: str, downstream_key: str) -> str:
    """Call the gateway with ``downstream_key`` (blocking: run it in a thread); return the charge id."""
    request = urllib.request.Request(url, method="POST", headers={"Idempotency-Key": downstream_key})
    with urllib.request.urlopen(request, timeout=10) as reply:
        charge_id: str = json.load(reply)["charge_id"]
    return charge_id


class Child:
    """A child process holding a lease: its stdout read line by line, its stdin written to."""

    def __init__(self, process: Process) -> None:
        assert process.stdout is not None
        self.process = process
        self._stdout = BufferedByteReceiveStream(process.stdout)

    async def line(self) -> list[str]:
        """The child's next line, split into words (waits at most 30 s)."""
        with anyio.fail_after(30):
            return (await self._stdout.receive_until(b"\n", 4096)).decode().split()

    async def tell(self, line: str) -> None:
        """Send the child a line on its stdin."""
        assert self.process.stdin is not None
        await self.process.stdin.send(line.encode() + b"\n")

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def exit_code(self) -> int:
        with anyio.fail_after(30):
            return await self.process.wait()


@asynccontextmanager
async def spawn(
    db: Database, gateway: FakeGateway, key: str, *, lease: float, heartbeat: float | None, mode: str
) -> AsyncIterator[Child]:
    """Start the child script on ``key``; kill it on the way out if it is still there (stopped, say)."""
    beat = "-" if heartbeat is None else str(heartbeat)
    command = [sys.executable, "-c", CHILD, db.url, gateway.url, key, str(lease), beat, mode]
    process = await anyio.open_process(command, cwd=ROOT, stdin=subprocess.PIPE, stderr=None)
    try:
        yield Child(process)
    finally:
        if process.returncode is None:
            process.kill()  # also ends a SIGSTOPped child
        with anyio.CancelScope(shield=True):
            await process.aclose()


async def until_stale(db: Database, key: str) -> None:
    """Return once the key's lease has run out by the database's clock (leases here last about 1 s)."""
    sql = text("SELECT count(*) FROM idempotency_keys WHERE key = :key AND locked_until <= now()")
    with anyio.fail_after(10):
        while True:
            async with db.engine.connect() as conn:
                if (await conn.execute(sql, {"key": key})).scalar_one():
                    return
            await anyio.sleep(0.05)  # waiting for a clock, not ordering processes


OPEN_TRANSACTIONS = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
)


async def stopped(child: Child) -> None:
    """Return once the kernel reports the child stopped (Linux's /proc): SIGSTOP is not synchronous."""
    stat = anyio.Path(f"/proc/{child.process.pid}/stat")
    with anyio.fail_after(10):
        while True:
            if (await stat.read_text()).rsplit(")", 1)[1].split()[0] == "T":
                return
            await anyio.sleep(0.001)  # waiting for the kernel, not ordering processes


async def stop_past_its_lease(db: Database, child: Child, key: str) -> None:
    """SIGSTOP the child and return once its lease on ``key`` is stale by the database's clock.

    A child stopped inside one of its heartbeat's renewals would hold the record's row lock for as long as
    it stays stopped, and a reclaim would wait on that lock: then let it go on, and stop it again.
    """
    with anyio.fail_after(20):
        while True:
            child.signal(signal.SIGSTOP)
            await stopped(child)
            await until_stale(db, key)
            async with db.engine.connect() as conn:
                if not (await conn.execute(OPEN_TRANSACTIONS)).scalar_one():
                    return
            child.signal(signal.SIGCONT)


async def db_clock(db: Database) -> float:
    """The database's wall clock, in seconds."""
    async with db.engine.connect() as conn:
        return float((await conn.execute(text("SELECT extract(epoch FROM clock_timestamp())"))).scalar_one())


async def refused(barrier: Barrier, key: str) -> None:
    """Assert that a fail-fast caller cannot take ``key``: KeyInProgressError, its body never entered."""
    with pytest.raises(KeyInProgressError):
        async with barrier.leased(key, scope=SCOPE, on_conflict=OnConflict.FAIL):
            pytest.fail(f"a lease on {key!r} was taken where the key is held")


async def finish(lease: Lease[JSON], key: str, response: JSON) -> None:
    """Write the business row and the outcome, fenced by the lease."""
    async with lease.finish() as uow:
        uow.session.add(Payment(key=key, amount=100))
        uow.complete(response)


async def replayed(barrier: Barrier, key: str) -> JSON:
    """The recorded response of ``key``, which must replay."""
    async with barrier.leased(key, scope=SCOPE, on_conflict=OnConflict.FAIL) as lease:
        assert lease.replayed
        return lease.response


async def test_killed_holder_is_reclaimed_after_expiry_and_resumes_at_its_checkpoint(
    pg_db: Database, gateway: FakeGateway
) -> None:
    """A holder killed after its external call blocks the key until expiry; the reclaimer resumes, once."""
    reclaims: list[Record] = []
    barrier, key = Barrier(pg_db.sessionmaker, on_reclaim=reclaims.append), new_key()
    async with spawn(pg_db, gateway, key, lease=1, heartbeat=None, mode="charge") as child:
        word, charge_id = await child.line()
        assert word == "charged"
        child.signal(signal.SIGKILL)
        assert await child.exit_code() == -signal.SIGKILL
    assert await pg_db.records(key) == [(SCOPE, key, "IN_PROGRESS")]
    assert await pg_db.payments(key) == 0
    await refused(barrier, key)  # the dead holder's lease still lives

    await until_stale(pg_db, key)
    async with barrier.leased(key, scope=SCOPE, on_conflict=OnConflict.FAIL) as lease:
        assert not lease.replayed
        assert lease.attempt == 2
        assert lease.checkpoint_name == "charged"
        assert lease.checkpoint_data == {"charge_id": charge_id}
        # Resuming at "charged": confirm the charge under the same downstream key; the gateway deduplicates.
        assert await anyio.to_thread.run_sync(charge, gateway.url, lease.downstream_key) == charge_id
        await finish(lease, key, {"charge_id": charge_id, "by": "reclaimer"})

    assert gateway.calls == {lease.downstream_key: 2}
    assert gateway.effects == {lease.downstream_key: 1}
    assert [(r.key, r.attempt) for r in reclaims] == [(key, 2)]
    assert await pg_db.records(key) == [(SCOPE, key, "COMPLETED")]
    assert await pg_db.payments(key) == 1
    assert await replayed(barrier, key) == {"charge_id": charge_id, "by": "reclaimer"}
    assert gateway.calls[lease.downstream_key] == 2  # the replay called nothing


async def test_paused_holder_is_fenced_off_after_another_reclaims_and_completes(
    pg_db: Database, gateway: FakeGateway
) -> None:
    """A holder stopped past its lease gets LeaseLostError on finishing after a reclaimer completed; no write."""
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    # The child renews by heartbeat: only the SIGSTOP (which freezes the heartbeat too) lets its lease lapse.
    async with spawn(pg_db, gateway, key, lease=1, heartbeat=0.2, mode="charge") as zombie:
        word, charge_id = await zombie.line()
        assert word == "charged"
        await stop_past_its_lease(pg_db, zombie, key)
        async with barrier.leased(key, scope=SCOPE, on_conflict=OnConflict.FAIL) as lease:
            assert lease.attempt == 2
            assert await anyio.to_thread.run_sync(charge, gateway.url, lease.downstream_key) == charge_id
            await finish(lease, key, {"charge_id": charge_id, "by": "reclaimer"})
        assert await pg_db.payments(key) == 1

        await zombie.tell("finish")  # read once it runs again
        zombie.signal(signal.SIGCONT)
        assert await zombie.line() == ["LeaseLostError"]
        assert await zombie.exit_code() == 0

    assert gateway.calls == {lease.downstream_key: 2}
    assert gateway.effects == {lease.downstream_key: 1}
    assert await pg_db.payments(key) == 1
    assert await pg_db.records(key) == [(SCOPE, key, "COMPLETED")]
    assert await replayed(barrier, key) == {"charge_id": charge_id, "by": "reclaimer"}


async def test_heartbeat_keeps_another_process_from_taking_the_key(pg_db: Database, gateway: FakeGateway) -> None:
    """A child's heartbeat keeps its 0.5 s lease for well over 1.5 s; then it finishes and the key is COMPLETED."""
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    async with spawn(pg_db, gateway, key, lease=0.5, heartbeat=0.1, mode="hold") as child:
        assert await child.line() == ["leased", "1"]
        refusals, start = 0, await db_clock(pg_db)
        with anyio.fail_after(10):
            while await db_clock(pg_db) - start < 1.6:
                await refused(barrier, key)
                refusals += 1
                await anyio.sleep(0.1)  # pacing the checks over three lease lengths, not ordering events
        assert refusals >= 5
        await child.tell("finish")
        assert await child.line() == ["finished"]
        assert await child.exit_code() == 0

    assert await pg_db.records(key) == [(SCOPE, key, "COMPLETED")]
    assert await pg_db.payments(key) == 1
    assert await replayed(barrier, key) == {"charge_id": None, "by": "child"}
    assert gateway.calls == {}
