"""Checkpoints: the last progress a lease holder recorded, for whoever reclaims the key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from idembarrier import _mysql_ddl as ddl

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def _placement() -> tuple[str, str | None]:
    """The records table's name and schema, as env.py resolved them (read at run time, not import time)."""
    attributes = context.config.attributes
    return attributes["table"], attributes["schema"]


def upgrade() -> None:
    table, schema = _placement()
    bind = op.get_bind()
    with op.batch_alter_table(table, schema=schema) as batch:
        batch.add_column(sa.Column("checkpoint_name", sa.String(255), nullable=True))
        batch.add_column(sa.Column("checkpoint_data", ddl.blob(bind), nullable=True))


def downgrade() -> None:
    table, schema = _placement()
    with op.batch_alter_table(table, schema=schema) as batch:
        batch.drop_column("checkpoint_data")
        batch.drop_column("checkpoint_name")
