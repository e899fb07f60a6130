"""The records table: one row per (scope, key).

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Released revisions are append-only: change the schema with a new revision, never by editing this one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _placement() -> tuple[str, str | None]:
    """The records table's name and schema, as env.py resolved them (read at run time, not import time)."""
    attributes = context.config.attributes
    return attributes["table"], attributes["schema"]


FINISHED = sa.text("status IN ('COMPLETED', 'FAILED')")
LEASED = sa.text("status = 'IN_PROGRESS'")


def upgrade() -> None:
    TABLE, SCHEMA = _placement()
    op.create_table(
        TABLE,
        sa.Column("scope", sa.String(255), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=True),
        sa.Column("token", sa.Uuid, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("scope", "key", name=f"pk_{TABLE}"),
        sa.CheckConstraint("status IN ('IN_PROGRESS', 'COMPLETED', 'FAILED', 'UNKNOWN')", name=f"ck_{TABLE}_status"),
        sa.CheckConstraint("length(key) BETWEEN 1 AND 255", name=f"ck_{TABLE}_key_length"),
        schema=SCHEMA,
    )
    op.create_index(
        f"ix_{TABLE}_expires_at",
        TABLE,
        ["expires_at"],
        schema=SCHEMA,
        postgresql_where=FINISHED,
        sqlite_where=FINISHED,
    )
    op.create_index(
        f"ix_{TABLE}_locked_until",
        TABLE,
        ["locked_until"],
        schema=SCHEMA,
        postgresql_where=LEASED,
        sqlite_where=LEASED,
    )


def downgrade() -> None:
    table, schema = _placement()
    op.drop_table(table, schema=schema)
