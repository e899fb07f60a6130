"""The records table: one row per (scope, key).

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Released revisions are append-only: change the schema with a new revision, never by editing this one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from idembarrier import _mysql_ddl as ddl

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
    bind = op.get_bind()  # MariaDB/MySQL get the types of `_mysql_ddl`; elsewhere they are as released
    op.create_table(
        TABLE,
        sa.Column("scope", ddl.key(bind), nullable=False),
        sa.Column("key", ddl.key(bind), nullable=False),
        sa.Column("fingerprint", ddl.blob(bind), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("response", ddl.blob(bind), nullable=True),
        sa.Column("token", sa.Uuid, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("created_at", ddl.timestamp(bind), nullable=False, server_default=ddl.now(bind)),
        sa.Column("updated_at", ddl.timestamp(bind), nullable=False, server_default=ddl.now(bind)),
        sa.Column("completed_at", ddl.timestamp(bind), nullable=True),
        sa.Column("expires_at", ddl.timestamp(bind), nullable=True),
        sa.Column("locked_until", ddl.timestamp(bind), nullable=True),
        sa.PrimaryKeyConstraint("scope", "key", name=f"pk_{TABLE}"),
        sa.CheckConstraint("status IN ('IN_PROGRESS', 'COMPLETED', 'FAILED', 'UNKNOWN')", name=f"ck_{TABLE}_status"),
        sa.CheckConstraint(ddl.key_length(bind), name=f"ck_{TABLE}_key_length"),
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
