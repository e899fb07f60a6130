"""The README's quickstart runs as written (only the database URL is the test's); tests/test_docs.py compiles and
type-checks it with the guide's other examples."""

from __future__ import annotations

import re
import textwrap
from typing import TYPE_CHECKING, Any

from sqlalchemy import Integer, MetaData
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tests.test_docs import README, python_blocks

if TYPE_CHECKING:
    from tests.conftest import Database


class _Base(DeclarativeBase):
    metadata = MetaData()


class QuickstartPayment(_Base):
    """The quickstart's "your ORM model"."""

    __tablename__ = "quickstart_payments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    amount: Mapped[int] = mapped_column(Integer)


def quickstart() -> str:
    """The first Python block after the Quickstart heading."""
    section = README.read_text().split("## Quickstart", 1)[1]
    return python_blocks(section)[0][1]


async def test_quickstart_runs_and_replays(pg_db: Database) -> None:
    """The quickstart installs the schema, pays once, and replays the same response for the same key."""
    async with pg_db.engine.begin() as conn:
        await conn.run_sync(_Base.metadata.create_all)
    code = re.sub(r'"postgresql\+asyncpg://[^"]*"', repr(pg_db.url), quickstart())
    namespace: dict[str, Any] = {"Payment": QuickstartPayment}
    # Top-level await, as in a notebook or an async REPL: run the block as an async function's body.
    exec(f"async def __quickstart():\n{textwrap.indent(code, '    ')}\n    return create_payment, engine", namespace)
    create_payment, engine = await namespace["__quickstart"]()
    body = {"amount": 4200}
    first = await create_payment("order-42", body)
    assert first == {"payment_id": 1}
    assert await create_payment("order-42", body) == first
    async with pg_db.engine.connect() as conn:
        assert (await conn.exec_driver_sql("SELECT count(*) FROM quickstart_payments")).scalar_one() == 1
    await engine.dispose()
