"""The main job: a burst of duplicate payment requests through the barrier, and what became of them."""

from __future__ import annotations

import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from sqlalchemy import Integer, MetaData, String, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .._barrier import Barrier
from .._config import OnConflict
from .._exceptions import FingerprintMismatchError, KeyInProgressError
from .._migrate import upgrade
from ._engine import create_engine

__all__ = ["DemoReport", "run_demo"]


class _Base(DeclarativeBase):
    metadata = MetaData()


class DemoPayment(_Base):
    """The demo's business table: one row per payment actually made."""

    __tablename__ = "idembarrier_demo_payments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run: Mapped[str] = mapped_column(String(32), index=True)
    order_key: Mapped[str] = mapped_column(String(255))
    amount: Mapped[int] = mapped_column(Integer)


@dataclass
class DemoReport:
    """What happened to the demo's requests."""

    database: str
    orders: int
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    payments: int = 0
    orders_paid_twice: int = 0

    @property
    def ok(self) -> bool:
        """Whether every order was paid exactly once."""
        return self.payments == self.orders and self.orders_paid_twice == 0


async def run_demo(
    database_url: str | None = None, *, orders: int = 20, duplicates: int = 8, retries: int = 3
) -> DemoReport:
    """Send each order as a burst of concurrent duplicates, then late retries and one altered request.

    Even-numbered orders wait for a concurrent holder; odd-numbered ones fail fast (HTTP 409). Runs on a
    temporary SQLite file unless ``database_url`` names another database.
    """
    with tempfile.TemporaryDirectory(prefix="idembarrier-demo-") as tmp:
        url = database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'demo.db'}"
        engine = create_engine(url)
        try:
            return await _run(engine, url, orders, duplicates, retries)
        finally:
            await engine.dispose()


async def _run(engine: AsyncEngine, url: str, orders: int, duplicates: int, retries: int) -> DemoReport:
    await upgrade(engine)
    async with engine.begin() as conn:
        await conn.run_sync(_Base.metadata.create_all)
    barrier = Barrier(async_sessionmaker(engine, expire_on_commit=False))
    run = uuid.uuid4().hex
    report = DemoReport(database=engine.url.render_as_string(hide_password=True), orders=orders)

    async def request(order: int, amount: int, on_conflict: OnConflict) -> None:
        key = f"order-{order}"
        report.requests += 1
        try:
            async with barrier.unit_of_work(
                key, scope=f"demo-{run}", fingerprint={"order": order, "amount": amount}, on_conflict=on_conflict
            ) as uow:
                if uow.replayed:
                    report.outcomes["replayed"] += 1
                    return
                uow.session.add(DemoPayment(run=run, order_key=key, amount=amount))
                uow.complete({"order": order, "amount": amount})
            report.outcomes["executed"] += 1
        except KeyInProgressError:
            report.outcomes["conflicted (409)"] += 1
        except FingerprintMismatchError:
            report.outcomes["rejected, different request (422)"] += 1

    async with anyio.create_task_group() as burst:
        for order in range(orders):
            mode = OnConflict.WAIT if order % 2 == 0 else OnConflict.FAIL
            for _ in range(duplicates):
                burst.start_soon(request, order, 100 + order, mode)
    for order in range(orders):
        for _ in range(retries):
            await request(order, 100 + order, OnConflict.WAIT)
        await request(order, 999, OnConflict.WAIT)

    async with engine.connect() as conn:
        per_order = select(DemoPayment.order_key, func.count()).where(DemoPayment.run == run)
        counts = (await conn.execute(per_order.group_by(DemoPayment.order_key))).all()
    report.payments = sum(n for _, n in counts)
    report.orders_paid_twice = sum(1 for _, n in counts if n > 1)
    return report


def format_report(report: DemoReport) -> str:
    """Render the report as the demo prints it."""
    lines = [
        f"database: {report.database}",
        f"{report.requests} requests for {report.orders} orders "
        "(bursts of concurrent duplicates, late retries, one altered request each)",
    ]
    lines += [f"  {name:<36}{count:>6}" for name, count in sorted(report.outcomes.items())]
    lines.append(
        f"payments written: {report.payments} for {report.orders} orders; paid twice: {report.orders_paid_twice}"
    )
    lines.append("OK: every order was paid exactly once" if report.ok else "FAILED: phantom writes")
    return "\n".join(lines)
