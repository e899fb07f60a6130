"""Two retention horizons: the response is dropped at response_expires_at, the compact record stays.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

Records finished before this revision keep their single horizon: their response stays until expires_at.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

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
    with op.batch_alter_table(table, schema=schema) as batch:
        batch.add_column(sa.Column("response_expires_at", sa.DateTime(timezone=True), nullable=True))
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
