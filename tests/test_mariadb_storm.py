"""A MariaDB storm across OS processes: duplicates of the same keys sent at the same moment from four processes.

Each of `PROCESSES` client processes (``tests.storm_worker direct``) holds its own pool of connections and sends
every key's share of duplicates at the key's slot, so a key's copies start together in different processes.
Whatever each attempt meets (a replay, a wait, a `KeyInProgressError` retried by the client), the key's
payment is written once and every copy acknowledges that same payment.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import func, select

from tests.models import Payment
from tests.storm_worker import ESCAPE, Plan, Result

if TYPE_CHECKING:
    from pathlib import Path

    from anyio.abc import Process

    from tests.conftest import Database

PROCESSES, KEYS, COPIES = 4, 64, 8
"""512 sends of 64 keys: 448 of them (87.5 %) duplicates, each key's 8 copies 2 per process."""


def plans(run: str) -> list[Plan]:
    """Each process's sends: 2 copies of every key, all copies of a key in one slot."""
    sends: list[list[tuple[int, str, int, float]]] = [[] for _ in range(PROCESSES)]
    for k in range(KEYS):
        for copy in range(COPIES):
            sends[copy % PROCESSES].append((k * COPIES + copy, f"{run}-{k}", k + 1, float(k)))
    return [
        Plan(rate=200.0, in_flight=16, deadline=10.0, attempts=20, abandon=0.0, seed=seed, sends=s)
        for seed, s in enumerate(sends)
    ]


async def storm(db: Database, tmp_path: Path) -> tuple[list[Result], dict[str, int]]:
    """Run the processes, line them up on ``ready``, start them at one T0; return their results and the payments."""
    run = f"storm{time.monotonic_ns()}"
    processes: list[tuple[Process, Path]] = []
    try:
        for index, plan in enumerate(plans(run)):
            plan_path, result_path = tmp_path / f"plan{index}.json", tmp_path / f"result{index}.json"
            plan_path.write_text(json.dumps(plan))
            command = [sys.executable, "-m", "tests.storm_worker", "direct", db.url, str(plan_path), str(result_path)]
            processes.append((await anyio.open_process(command, stdin=-1, stdout=-1, stderr=None), result_path))
        for process, _ in processes:
            assert process.stdout is not None
            assert (await process.stdout.receive()).strip() == b"ready"
        t0 = time.monotonic() + 0.2  # system-wide monotonic clock: the same T0 in every process
        for process, _ in processes:
            assert process.stdin is not None
            await process.stdin.send(f"go {t0}\n".encode())
        with anyio.fail_after(240):
            for process, _ in processes:
                assert await process.wait() == 0
    finally:
        for process, _ in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    results = [json.loads(path.read_text()) for _, path in processes]
    async with db.engine.connect() as conn:
        rows = await conn.execute(select(Payment.key, func.count()).group_by(Payment.key))
        payments = {str(key): int(count) for key, count in rows.all()}
    return results, payments


def check(results: list[Result], payments: dict[str, int]) -> Counter[str]:
    """Assert each key paid once and acknowledged once; return the attempts' outcomes by type."""
    outcomes: Counter[str] = Counter()
    acknowledged: dict[str, set[int | None]] = {}
    finished: Counter[int] = Counter()
    for result in results:
        assert result["escapes"] == []
        for send, key, _attempt, outcome, _start, _end, payment_id in result["attempts"]:
            outcomes[outcome] += 1
            assert not outcome.startswith(ESCAPE)
            if outcome == "ok":
                acknowledged.setdefault(key, set()).add(payment_id)
                finished[send] += 1
    assert len(payments) == KEYS
    assert set(payments.values()) == {1}  # every key executed once: no duplicate business row
    assert all(len(ids) == 1 for ids in acknowledged.values())  # every copy acknowledges the same payment
    assert len(finished) == KEYS * COPIES  # every send answered…
    assert set(finished.values()) == {1}  # …once
    return outcomes


@pytest.mark.timeout(300)
async def test_four_processes_storming_mariadb_through_asyncmy_execute_each_key_once(
    mariadb_db: Database, tmp_path: Path
) -> None:
    """Four processes send 512 requests of 64 keys (448 duplicates) through asyncmy: 64 payments, one per key."""
    outcomes = check(*await storm(mariadb_db, tmp_path))
    print(f"\nasyncmy storm: {dict(outcomes)}")


@pytest.mark.timeout(300)
async def test_four_processes_storming_mariadb_through_aiomysql_execute_each_key_once(
    aiomysql_db: Database, tmp_path: Path
) -> None:
    """The same storm through aiomysql: 64 payments, one per key, every copy acknowledging it."""
    outcomes = check(*await storm(aiomysql_db, tmp_path))
    print(f"\naiomysql storm: {dict(outcomes)}")
