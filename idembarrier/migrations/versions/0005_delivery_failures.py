"""Poison handling: outbox rows count their refusals and park; consumers count handler failures durably.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Outbox rows written before this revision start with no refusal and unparked. Their message ids follow
version 1 of the header contract (no execution in the id); consumers read them as they always did.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from idembarrier import _mysql_ddl as ddl

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

PARKED = sa.text("parked_at IS NOT NULL")


def _placement() -> tuple[str, str | None]:
    """The records table's name and schema, as env.py resolved them (read at run time, not import time)."""
    attributes = context.config.attributes
    return attributes["table"], attributes["schema"]


def upgrade() -> None:
    records, schema = _placement()
    bind = op.get_bind()
    outbox = f"{records}_outbox"
    with op.batch_alter_table(outbox, schema=schema) as batch:
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("last_error", ddl.long_text(bind), nullable=True))
        batch.add_column(sa.Column("parked_at", ddl.timestamp(bind), nullable=True))
    op.create_index(
        f"ix_{outbox}_parked",
        outbox,
        ["topic", "id"],
        schema=schema,
        postgresql_where=PARKED,
        sqlite_where=PARKED,
    )
    failures = f"{records}_failures"
    op.create_table(
        failures,
        sa.Column("scope", ddl.key(bind), nullable=False),
        sa.Column("key", ddl.key(bind), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", ddl.long_text(bind), nullable=False),
        sa.Column("first_failed_at", ddl.timestamp(bind), nullable=False, server_default=ddl.now(bind)),
        sa.Column("last_failed_at", ddl.timestamp(bind), nullable=False, server_default=ddl.now(bind)),
        sa.PrimaryKeyConstraint("scope", "key", name=f"pk_{failures}"),
        schema=schema,
    )


def downgrade() -> None:
    records, schema = _placement()
    outbox = f"{records}_outbox"
    op.drop_table(f"{records}_failures", schema=schema)
    op.drop_index(f"ix_{outbox}_parked", table_name=outbox, schema=schema)
    with op.batch_alter_table(outbox, schema=schema) as batch:
        batch.drop_column("parked_at")
        batch.drop_column("last_error")
        batch.drop_column("attempts")
