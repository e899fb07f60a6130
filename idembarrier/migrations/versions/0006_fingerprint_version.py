"""The fingerprint's version, stored with each record, so that a deploy may change what is fingerprinted.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Nullable, with no default: records made before this revision, and by barriers without `FingerprintVersions`,
have none, and are compared as they always were.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def _placement() -> tuple[str, str | None]:
    """The records table's name and schema, as env.py resolved them (read at run time, not import time)."""
    attributes = context.config.attributes
    return attributes["table"], attributes["schema"]


def upgrade() -> None:
    table, schema = _placement()
    with op.batch_alter_table(table, schema=schema) as batch:
        batch.add_column(sa.Column("fingerprint_version", sa.Integer, nullable=True))


def downgrade() -> None:
    table, schema = _placement()
    with op.batch_alter_table(table, schema=schema) as batch:
        batch.drop_column("fingerprint_version")
