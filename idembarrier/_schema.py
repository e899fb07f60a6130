"""The records table and its outbox, declared once: the migrations must produce exactly this (a test checks it)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)

from ._config import DEFAULT_TABLE
from ._record import Status

__all__ = ["VERSION_TABLE", "failures_name", "failures_table", "outbox_name", "outbox_table", "records_table"]

VERSION_TABLE = "idembarrier_alembic_version"
"""idembarrier's own Alembic version table, so it never collides with the application's history."""

_STATUSES = ", ".join(f"'{status.value}'" for status in Status)


def records_table(
    metadata: MetaData, name: str = DEFAULT_TABLE, schema: str | None = None, *, dialect: str | None = None
) -> Table:
    """Declare the records table, and its outbox (see `outbox_table`), on ``metadata``.

    ``dialect`` is the SQLAlchemy dialect's name the table is declared for: on ``"postgresql"`` the table
    has ``cleanup_at`` and one index on it instead of the three partial indexes, so that a completion is a
    HOT update (revision 0007); anything else (``None`` included) gets the layout SQLite and MariaDB keep.

    Columns:
        scope: namespace of the key (tenant, operation, consumer group); part of the primary key.
        key: the idempotency key, 1-255 characters; unique within its scope.
        fingerprint: SHA-256 of the canonical request, NULL when the caller gave none.
        fingerprint_version: the `FingerprintVersions` version that made the fingerprint; NULL without one.
        status: IN_PROGRESS, COMPLETED, FAILED or UNKNOWN.
        response: the codec's bytes for the recorded outcome; NULL until finished.
        token: the claim token of the current holder; completion is conditioned on it (fencing).
        attempt: how many times the key was claimed; above 1 only after a lease was reclaimed.
        created_at / updated_at / completed_at: database-clock timestamps.
        expires_at: from when cleanup may delete the record; never read for deduplication.
        response_expires_at: from when cleanup may drop the response, keeping the compact record.
        locked_until: end of a lease (leased work only); a reclaim may take the key after it.
        checkpoint_name / checkpoint_data: the last progress a lease holder recorded, for a reclaimer.
        cleanup_at (PostgreSQL): from when cleanup may next act on the record; set at the claim to a lower
            bound of its response horizon, left alone by the completion, moved to expires_at by compaction.
    """
    outbox_table(metadata, name, schema)
    if dialect == "postgresql":
        # Nothing the completion writes is indexed, nor read by an index's predicate: a HOT update.
        layout: tuple[Column[Any] | Index, ...] = (
            Column("cleanup_at", DateTime(timezone=True), nullable=True),
            Index(f"ix_{name}_cleanup_at", "cleanup_at"),
        )
    else:
        layout = _partial_indexes(name)
    failures_table(metadata, name, schema)
    return Table(
        name,
        metadata,
        Column("scope", String(255), nullable=False),
        Column("key", String(255), nullable=False),
        Column("fingerprint", LargeBinary, nullable=True),
        Column("status", String(16), nullable=False),
        Column("response", LargeBinary, nullable=True),
        Column("token", Uuid, nullable=False),
        Column("attempt", Integer, nullable=False, server_default=text("1")),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("completed_at", DateTime(timezone=True), nullable=True),
        Column("expires_at", DateTime(timezone=True), nullable=True),
        Column("locked_until", DateTime(timezone=True), nullable=True),
        Column("checkpoint_name", String(255), nullable=True),
        Column("checkpoint_data", LargeBinary, nullable=True),
        Column("response_expires_at", DateTime(timezone=True), nullable=True),
        Column("fingerprint_version", Integer, nullable=True),
        PrimaryKeyConstraint("scope", "key", name=f"pk_{name}"),
        CheckConstraint(f"status IN ({_STATUSES})", name=f"ck_{name}_status"),
        CheckConstraint("length(key) BETWEEN 1 AND 255", name=f"ck_{name}_key_length"),
        *layout,
        schema=schema,
    )


def _partial_indexes(name: str) -> tuple[Index, ...]:
    """The indexes of the records table outside PostgreSQL."""
    return (
        # Cleanup scans finished records by expiry; reclaim scans live leases by their end.
        Index(
            f"ix_{name}_expires_at",
            "expires_at",
            postgresql_where=text("status IN ('COMPLETED', 'FAILED')"),
            sqlite_where=text("status IN ('COMPLETED', 'FAILED')"),
        ),
        Index(
            f"ix_{name}_response_expires_at",
            "response_expires_at",
            postgresql_where=text("response IS NOT NULL"),
            sqlite_where=text("response IS NOT NULL"),
        ),
        Index(
            f"ix_{name}_locked_until",
            "locked_until",
            postgresql_where=text("status = 'IN_PROGRESS'"),
            sqlite_where=text("status = 'IN_PROGRESS'"),
        ),
    )


def outbox_name(records: str) -> str:
    """The outbox table's name for the records table ``records``."""
    return f"{records}_outbox"


def outbox_table(metadata: MetaData, records: str = DEFAULT_TABLE, schema: str | None = None) -> Table:
    """Declare the outbox of the records table ``records`` on ``metadata``: ``<records>_outbox``.

    Columns:
        id: insertion order; the relay publishes in this order.
        message_id: the deterministic message id (see `message_id`), unique.
        topic / key / value: the Kafka message; key is NULL for an unkeyed message.
        headers: the message's headers as JSON, ``[[name, base64 value], ...]``, ours included.
        scope / record_key / position: the record whose unit of work published it, and the message's
            place among that unit of work's messages.
        created_at: database clock at insertion; sent_at: when a relay marked it published (NULL: pending).
        attempts / last_error: how often the broker refused the message for good, and why, last.
        parked_at: when the relay gave up on it after ``max_attempts`` refusals (NULL: not parked); the
            key's later messages wait behind it until an operator releases or drops it.
    """
    name = outbox_name(records)
    return Table(
        name,
        metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("message_id", String(64), nullable=False),
        Column("topic", String(255), nullable=False),
        Column("key", LargeBinary, nullable=True),
        Column("value", LargeBinary, nullable=False),
        Column("headers", Text, nullable=False),
        Column("scope", String(255), nullable=False),
        Column("record_key", String(255), nullable=False),
        Column("position", Integer, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("sent_at", DateTime(timezone=True), nullable=True),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("last_error", Text, nullable=True),
        Column("parked_at", DateTime(timezone=True), nullable=True),
        UniqueConstraint("message_id", name=f"uq_{name}_message_id"),
        # The relay scans pending messages in insertion order.
        Index(
            f"ix_{name}_pending",
            "id",
            postgresql_where=text("sent_at IS NULL"),
            sqlite_where=text("sent_at IS NULL"),
        ),
        # The relay holds back the later messages of a parked message's (topic, key); parked rows are few.
        Index(
            f"ix_{name}_parked",
            "topic",
            "id",
            postgresql_where=text("parked_at IS NOT NULL"),
            sqlite_where=text("parked_at IS NOT NULL"),
        ),
        schema=schema,
    )


def failures_name(records: str) -> str:
    """The consumer failures table's name for the records table ``records``."""
    return f"{records}_failures"


def failures_table(metadata: MetaData, records: str = DEFAULT_TABLE, schema: str | None = None) -> Table:
    """Declare the handler failures of consumed messages on ``metadata``: ``<records>_failures``.

    One row per (scope, key) of a consumed message whose handler raised, counted in transactions of their
    own, so that a restart does not reset the count that sends a poison message to its dead letter.

    Columns:
        scope / key: the consumer's scope (``consumer:<group>``) and the message's id.
        attempts: how many times its handler failed; last_error: the last failure, as ``repr``.
        first_failed_at / last_failed_at: database-clock timestamps.
    """
    name = failures_name(records)
    return Table(
        name,
        metadata,
        Column("scope", String(255), nullable=False),
        Column("key", String(255), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("last_error", Text, nullable=False),
        Column("first_failed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("last_failed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        PrimaryKeyConstraint("scope", "key", name=f"pk_{name}"),
        schema=schema,
    )
