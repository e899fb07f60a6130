"""The transactional outbox: messages a unit of work publishes, committed with its record.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from idembarrier import _mysql_ddl as ddl

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

PENDING = sa.text("sent_at IS NULL")


def _placement() -> tuple[str, str | None]:
    """The records table's name and schema, as env.py resolved them (read at run time, not import time)."""
    attributes = context.config.attributes
    return attributes["table"], attributes["schema"]


def upgrade() -> None:
    records, schema = _placement()
    bind = op.get_bind()
    table = f"{records}_outbox"
    op.create_table(
        table,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("key", ddl.blob(bind), nullable=True),
        sa.Column("value", ddl.blob(bind), nullable=False),
        sa.Column("headers", ddl.long_text(bind), nullable=False),
        sa.Column("scope", ddl.key(bind), nullable=False),
        sa.Column("record_key", ddl.key(bind), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("created_at", ddl.timestamp(bind), nullable=False, server_default=ddl.now(bind)),
        sa.Column("sent_at", ddl.timestamp(bind), nullable=True),
        sa.UniqueConstraint("message_id", name=f"uq_{table}_message_id"),
        schema=schema,
    )
    op.create_index(
        f"ix_{table}_pending",
        table,
        ["id"],
        schema=schema,
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )


def downgrade() -> None:
    records, schema = _placement()
    op.drop_table(f"{records}_outbox", schema=schema)
