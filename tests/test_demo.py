"""The main job: bursts of duplicate payments through the barrier, reported per outcome."""

from __future__ import annotations

from typing import TYPE_CHECKING

from idembarrier.cli._demo import format_report, run_demo
from tests._cli import run

if TYPE_CHECKING:
    import pytest

    from tests.conftest import Database


async def test_demo_pays_every_order_once_on_embedded_sqlite() -> None:
    """On the default engine every order runs once; duplicates replay and altered requests are rejected."""
    report = await run_demo(orders=6, duplicates=5, retries=2)
    assert report.database.startswith("sqlite+aiosqlite:///")
    assert report.ok
    assert report.payments == report.orders == 6
    assert report.requests == 6 * (5 + 2 + 1)
    assert report.outcomes["executed"] == 6
    assert report.outcomes["rejected, different request (422)"] == 6
    assert sum(report.outcomes.values()) == report.requests
    assert "OK: every order was paid exactly once" in format_report(report)


async def test_demo_pays_every_order_once_on_postgresql(pg_db: Database) -> None:
    """With a PostgreSQL URL the demo runs there, and fail-fast duplicates may answer 409."""
    report = await run_demo(pg_db.url, orders=6, duplicates=8, retries=2)
    assert report.database.startswith("postgresql+asyncpg://")
    assert report.ok
    assert report.outcomes["executed"] == 6
    assert report.outcomes["replayed"] + report.outcomes["conflicted (409)"] == 6 * (8 + 2) - 6
    assert await pg_db.payments() == 0  # the demo writes its own table, not the tests' payments


def test_command_line_runs_the_demo_and_exits_zero(capfd: pytest.CaptureFixture[str]) -> None:
    """`python -m idembarrier demo` prints the outcomes and exits 0 when no order was paid twice."""
    done = run(capfd, "demo", "--orders", "3", "--duplicates", "3")
    assert done.status == 0, done.err
    assert "payments written: 3 for 3 orders; paid twice: 0" in done.out
