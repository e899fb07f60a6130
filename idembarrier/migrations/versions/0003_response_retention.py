"""Two retention horizons: the response is dropped at response_expires_at, the compact record stays.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

Records finished before this revision had one horizon, expires_at (completion + 7 days): it becomes their
response horizon, and their record horizon moves to completion + 30 days, the new default, so that a late
replay of an old request meets a compact record rather than nothing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from idembarrier import _mysql_ddl as ddl

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

WITH_RESPONSE = sa.text("response IS NOT NULL")


def _placement() -> tuple[str, str | None]:
    """The records table's name and schema, as env.py resolved them (read at run time, not import time)."""
    attributes = context.config.attributes
    return attributes["table"], attributes["schema"]


def upgrade() -> None:
    table, schema = _placement()
    bind = op.get_bind()
    with op.batch_alter_table(table, schema=schema) as batch:
        batch.add_column(sa.Column("response_expires_at", ddl.timestamp(bind), nullable=True))
    qualified = f'"{schema}"."{table}"' if schema else f'"{table}"'
    thirty_days = (
        "completed_at + interval '30 days'"
        if bind.dialect.name == "postgresql"
        else "datetime(completed_at, '+30 days')"
    )
    if ddl.is_mysql(bind):  # backquotes, and its own date arithmetic
        quote = bind.dialect.identifier_preparer.quote
        qualified = f"{quote(schema)}.{quote(table)}" if schema else quote(table)
        thirty_days = "completed_at + INTERVAL 30 DAY"
    op.execute(
        f"""UPDATE {qualified}
            SET response_expires_at = expires_at,
                expires_at = CASE WHEN expires_at > {thirty_days} THEN expires_at ELSE {thirty_days} END
            WHERE status IN ('COMPLETED', 'FAILED') AND completed_at IS NOT NULL"""
    )
    op.create_index(
        f"ix_{table}_response_expires_at",
        table,
        ["response_expires_at"],
        schema=schema,
        postgresql_where=WITH_RESPONSE,
        sqlite_where=WITH_RESPONSE,
    )


def downgrade() -> None:
    table, schema = _placement()
    op.drop_index(f"ix_{table}_response_expires_at", table_name=table, schema=schema)
    with op.batch_alter_table(table, schema=schema) as batch:
        batch.drop_column("response_expires_at")
