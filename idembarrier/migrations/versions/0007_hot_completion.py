"""PostgreSQL: a completion the server applies as a HOT update, and cleanup served by a horizon set at the claim.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

A completion writes status, response and the horizons. Every index on one of those columns, or whose
predicate reads one (the partial indexes on expires_at, response_expires_at and locked_until), made each
completion a non-HOT update: a new heap tuple on another page plus a new entry in every index, the primary
key's included. Here the records table keeps its primary key and one index, on ``cleanup_at``: from when
cleanup may next act on the record, a lower bound of its response horizon until the response is dropped,
then its record horizon. The claim sets it (claim time + the response retention, known then), the completion
leaves it as it is, compaction moves it to ``expires_at``. A fillfactor of 80 leaves each page room for
its rows' completed versions.

On PostgreSQL only: SQLite and MariaDB/MySQL keep their layout, and this revision changes nothing there.
The backfill rewrites every finished record once; the fillfactor applies to pages written from now on.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

FILLFACTOR = 80


def _placement() -> tuple[str, str | None]:
    """The records table's name and schema, as env.py resolved them (read at run time, not import time)."""
    attributes = context.config.attributes
    return attributes["table"], attributes["schema"]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    table, schema = _placement()
    qualified = f'"{schema}"."{table}"' if schema else f'"{table}"'
    op.drop_index(f"ix_{table}_expires_at", table_name=table, schema=schema)
    op.drop_index(f"ix_{table}_response_expires_at", table_name=table, schema=schema)
    op.drop_index(f"ix_{table}_locked_until", table_name=table, schema=schema)
    op.add_column(table, sa.Column("cleanup_at", sa.DateTime(timezone=True), nullable=True), schema=schema)
    # Exact horizons for what is finished; IN_PROGRESS and UNKNOWN records get theirs when they finish.
    op.execute(
        f"""UPDATE {qualified}
            SET cleanup_at = CASE WHEN response IS NOT NULL THEN coalesce(response_expires_at, expires_at)
                                  ELSE expires_at END
            WHERE status IN ('COMPLETED', 'FAILED')"""
    )
    op.create_index(f"ix_{table}_cleanup_at", table, ["cleanup_at"], schema=schema)
    op.execute(f"ALTER TABLE {qualified} SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    table, schema = _placement()
    qualified = f'"{schema}"."{table}"' if schema else f'"{table}"'
    op.execute(f"ALTER TABLE {qualified} RESET (fillfactor)")
    op.drop_index(f"ix_{table}_cleanup_at", table_name=table, schema=schema)
    op.drop_column(table, "cleanup_at", schema=schema)
    op.create_index(
        f"ix_{table}_expires_at",
        table,
        ["expires_at"],
        schema=schema,
        postgresql_where=sa.text("status IN ('COMPLETED', 'FAILED')"),
    )
    op.create_index(
        f"ix_{table}_response_expires_at",
        table,
        ["response_expires_at"],
        schema=schema,
        postgresql_where=sa.text("response IS NOT NULL"),
    )
    op.create_index(
        f"ix_{table}_locked_until",
        table,
        ["locked_until"],
        schema=schema,
        postgresql_where=sa.text("status = 'IN_PROGRESS'"),
    )
