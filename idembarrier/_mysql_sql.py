"""MariaDB's statements on idembarrier's tables, by name, each with the concurrency condition it relies on.

`idembarrier._mysql` runs them; see its docstring for what MariaDB offers the barrier (a plain INSERT as
the claim, ``SET STATEMENT`` bounds, locking reads where PostgreSQL reads what it changed).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ._storage import Names

__all__ = ["OUTBOX_COLUMNS", "Statements", "statements"]

_COLUMNS = (
    "scope, `key`, status, fingerprint, fingerprint_version, response, token, attempt, created_at, completed_at, "
    "expires_at"
)
_LEASE_COLUMNS = f"{_COLUMNS}, locked_until, checkpoint_name, checkpoint_data"
_HORIZON_COLUMNS = f"{_LEASE_COLUMNS}, response_expires_at"
_NOW = "UTC_TIMESTAMP(6)"
# As on PostgreSQL: stale once its end has passed on the database's clock; an IN_PROGRESS record without an end
# is stale too.
_STALE = f"(locked_until IS NULL OR locked_until <= {_NOW})"
_LATER = f"{_NOW} + INTERVAL %s MICROSECOND"
_HELD = "scope = %s AND `key` = %s AND token = %s AND status = 'IN_PROGRESS'"
_EXPIRES_IN = f"TIMESTAMPDIFF(MICROSECOND, {_NOW}, response_expires_at) / 1e6 AS response_expires_in"
OUTBOX_COLUMNS = ("message_id", "topic", "key", "value", "headers", "scope", "record_key", "position")


class Statements(NamedTuple):
    """Every statement on one records table, its outbox and its failures, by name (as on PostgreSQL)."""

    lookup: str
    claim: str
    existing: str
    finish: str
    retake: str
    lease_claim: str
    lease_existing: str
    inspect: str
    reclaim_lock: str
    reclaim: str
    reclaimed: str
    renew: str
    checkpoint: str
    fence: str
    release: str
    unresolved: str
    resolve: str
    records: str
    distribution: str
    purge_lock: str
    purge: str
    compact_lock: str
    compact: str
    purgeable: str
    write_outbox: str
    claim_outbox: str
    outbox_pending: str
    mark_sent: str
    refuse: str
    refused: str
    parked: str
    release_parked: str
    drop_parked: str
    outbox_counts: str
    purge_sent_lock: str
    purge_sent: str
    count_failure: str
    forget_failure: str


@cache
def statements(names: Names) -> Statements:
    """The statements on ``names``' tables, built once per records table."""
    table, outbox, failures = names.records, names.outbox, names.failures
    parked_one = "message_id = %s AND parked_at IS NOT NULL AND sent_at IS NULL"
    return Statements(
        # A consistent read: it waits for nobody, and sees what committed before its snapshot.
        # What the response has left, on the database's clock: a replay may be answered from memory that long.
        lookup=f"SELECT {_COLUMNS}, {_EXPIRES_IN} FROM {table} WHERE scope = %s AND `key` = %s",
        # The atomic claim: the primary key takes the key or refuses it, with no window between check and
        # insert. On a concurrent uncommitted insert of the same key, InnoDB makes this one wait (bounded by
        # `_bounded`), then inserts (the holder rolled back) or raises 1062 (it committed).
        claim=f"""INSERT INTO {table} (scope, `key`, fingerprint, status, token, fingerprint_version,
                                        created_at, updated_at)
                  VALUES (%s, %s, %s, 'IN_PROGRESS', %s, %s, {_NOW}, {_NOW})""",
        # After a 1062: a locking read sees the latest committed record whatever this transaction's snapshot
        # (REPEATABLE READ), and holds it shared until this transaction ends.
        existing=f"SELECT {_COLUMNS} FROM {table} WHERE scope = %s AND `key` = %s LOCK IN SHARE MODE",
        # Fenced completion, as on PostgreSQL: only the holder of `token` matches. UTC_TIMESTAMP(6) is one
        # instant for the whole statement.
        finish=f"""
            UPDATE {table}
            SET status = %s, response = %s, completed_at = {_NOW}, updated_at = {_NOW},
                response_expires_at = {_LATER}, expires_at = {_LATER}, locked_until = NULL
            WHERE scope = %s AND `key` = %s AND token = %s""",
        # Takes a compact record over for a late request, in the unit of work's transaction (the row lock
        # makes a concurrent late duplicate wait, then find it IN_PROGRESS no more).
        retake=f"""
            UPDATE {table}
            SET status = 'IN_PROGRESS', token = %s, attempt = attempt + 1, updated_at = {_NOW},
                completed_at = NULL, response_expires_at = NULL, expires_at = NULL,
                checkpoint_name = NULL, checkpoint_data = NULL
            WHERE scope = %s AND `key` = %s AND status IN ('COMPLETED', 'FAILED') AND response IS NULL""",
        # -- leased work: each in a transaction of its own, committed by the caller.
        lease_claim=f"""INSERT INTO {table} (scope, `key`, fingerprint, status, token, locked_until,
                                              fingerprint_version, created_at, updated_at)
                        VALUES (%s, %s, %s, 'IN_PROGRESS', %s, {_LATER}, %s, {_NOW}, {_NOW})""",
        lease_existing=f"""
            SELECT {_LEASE_COLUMNS}, {_STALE} AS stale FROM {table} WHERE scope = %s AND `key` = %s
            LOCK IN SHARE MODE""",
        inspect=f"SELECT {_HORIZON_COLUMNS}, {_STALE} AS stale FROM {table} WHERE scope = %s AND `key` = %s",
        # Takes over a stale lease in three statements of one transaction: the row is locked first, SKIP
        # LOCKED (a row another transaction holds, its holder renewing or another reclaimer, is passed by: the
        # caller treats it as still held), conditioned on the token the reclaimer saw and on staleness by the
        # database's clock; the update then runs on the locked row, and the read returns it.
        reclaim_lock=f"SELECT 1 FROM {table} WHERE {_HELD} AND {_STALE} FOR UPDATE SKIP LOCKED",
        # MariaDB assigns left to right, each seeing the columns already assigned: `attempt` goes last so that
        # the CASEs before it read the attempt the reclaimer found.
        reclaim=f"""
            UPDATE {table}
            SET token = %s, updated_at = {_NOW},
                status = CASE WHEN attempt > %s THEN 'UNKNOWN' ELSE 'IN_PROGRESS' END,
                locked_until = CASE WHEN attempt > %s THEN NULL ELSE {_LATER} END,
                attempt = CASE WHEN attempt > %s THEN attempt ELSE attempt + 1 END
            WHERE scope = %s AND `key` = %s AND token = %s""",
        reclaimed=f"SELECT {_LEASE_COLUMNS} FROM {table} WHERE scope = %s AND `key` = %s",
        # Renewal, checkpoint and release are fenced by the token (affected rows count matched rows: the
        # dialect connects with CLIENT_FOUND_ROWS).
        renew=f"UPDATE {table} SET locked_until = {_LATER}, updated_at = {_NOW} WHERE {_HELD}",
        checkpoint=f"""
            UPDATE {table} SET checkpoint_name = %s, checkpoint_data = %s, updated_at = {_NOW} WHERE {_HELD}""",
        # Inside the completing transaction: the row lock keeps a reclaimer out (its SKIP LOCKED passes the row
        # by) until the outcome commits.
        fence=f"SELECT 1 FROM {table} WHERE {_HELD} FOR UPDATE",
        release=f"DELETE FROM {table} WHERE {_HELD}",
        unresolved=f"""
            SELECT {_LEASE_COLUMNS}, TIMESTAMPDIFF(MICROSECOND, created_at, {_NOW}) AS age FROM {table}
            WHERE status = 'UNKNOWN' OR (status = 'IN_PROGRESS' AND {_STALE})
            ORDER BY created_at LIMIT %s""",
        # An operator's resolution: only of an UNKNOWN record or a stale lease.
        resolve=f"""
            UPDATE {table}
            SET status = %s, response = %s, completed_at = {_NOW}, updated_at = {_NOW},
                response_expires_at = {_LATER}, expires_at = {_LATER}, locked_until = NULL
            WHERE scope = %s AND `key` = %s
              AND (status = 'UNKNOWN' OR (status = 'IN_PROGRESS' AND {_STALE}))""",
        # A plain read. A NULL filter is no filter (the statuses come comma-separated); ages on the database's
        # clock. Newest first; ties in key order.
        records=f"""
            SELECT {_HORIZON_COLUMNS}, {_STALE} AS stale FROM {table}
            WHERE (%s IS NULL OR FIND_IN_SET(status, %s))
              AND (%s IS NULL OR scope = %s)
              AND (%s IS NULL OR created_at <= {_NOW} - INTERVAL %s MICROSECOND)
              AND (%s IS NULL OR created_at > {_NOW} - INTERVAL %s MICROSECOND)
            ORDER BY created_at DESC, scope, `key` LIMIT %s""",
        # -- operations
        distribution=f"""
            SELECT status, count(*) AS records,
                   TIMESTAMPDIFF(MICROSECOND, min(created_at), {_NOW}) AS oldest
            FROM {table} GROUP BY status""",
        # Purge and compact lock their rows first, SKIP LOCKED: they never wait for, nor change under, a row
        # another transaction holds; then change exactly the rows they hold. IN_PROGRESS and UNKNOWN records
        # are never selected. (MariaDB has no partial index: plain indexes on the horizons serve the scans.)
        purge_lock=f"""
            SELECT scope, `key` FROM {table}
            WHERE status IN ('COMPLETED', 'FAILED') AND expires_at <= {_NOW}
            ORDER BY expires_at LIMIT %s
            FOR UPDATE SKIP LOCKED""",
        purge=f"DELETE FROM {table} WHERE (scope, `key`) IN ({{pairs}})",
        compact_lock=f"""
            SELECT scope, `key` FROM {table}
            WHERE status IN ('COMPLETED', 'FAILED') AND response IS NOT NULL AND response_expires_at <= {_NOW}
            ORDER BY response_expires_at LIMIT %s
            FOR UPDATE SKIP LOCKED""",
        compact=f"UPDATE {table} SET response = NULL, updated_at = {_NOW} WHERE (scope, `key`) IN ({{pairs}})",
        # What compact and purge would take, with their own conditions, locked rows included.
        purgeable=f"""
            SELECT (
                SELECT count(*) FROM {table}
                WHERE status IN ('COMPLETED', 'FAILED') AND response IS NOT NULL AND response_expires_at <= {_NOW}
            ) AS compacted, (
                SELECT count(*) FROM {table} WHERE status IN ('COMPLETED', 'FAILED') AND expires_at <= {_NOW}
            ) AS deleted""",
        # -- the outbox
        # In the unit of work's transaction: the messages exist if and only if it commits.
        write_outbox=f"""
            INSERT INTO {outbox} ({", ".join(f"`{c}`" for c in OUTBOX_COLUMNS)}, created_at)
            VALUES ({", ".join("%s" for _ in OUTBOX_COLUMNS)}, {_NOW})""",
        # The relay's claim: SKIP LOCKED keeps relays off each other's rows. A parked message holds back the
        # later messages of its (topic, key), as on PostgreSQL. MariaDB has no transaction-scoped advisory lock
        # (GET_LOCK survives a rollback), so order per key is kept by `outbox_pending` instead.
        claim_outbox=f"""
            SELECT id, message_id, topic, `key`, value, headers FROM {outbox} AS o
            WHERE sent_at IS NULL AND parked_at IS NULL
              AND NOT EXISTS (
                  SELECT 1 FROM {outbox} AS parked
                  WHERE parked.parked_at IS NOT NULL AND parked.sent_at IS NULL
                    AND parked.topic = o.topic AND parked.`key` = o.`key` AND parked.id < o.id
              )
            ORDER BY id LIMIT %s
            FOR UPDATE SKIP LOCKED""",
        # Read after the claim locked its rows (a consistent read whose snapshot is taken now, unless the
        # transaction read before): the pending messages of the claimed topics up to the last one held. A held
        # message goes out only if every older pending message of its (topic, key) goes out before it in this
        # batch; one behind a message another relay holds (or that the claim passed by, locked) waits for a
        # later claim. So a key's messages are published in order, whichever relays run.
        outbox_pending=f"""
            SELECT topic, `key`, id FROM {outbox}
            WHERE sent_at IS NULL AND parked_at IS NULL AND topic IN ({{topics}}) AND id <= %s
            ORDER BY id""",
        # On rows this batch's claim holds.
        mark_sent=f"UPDATE {outbox} SET sent_at = {_NOW} WHERE id IN ({{ids}})",
        # `parked_at` before `attempts`: assignments see the columns already assigned.
        refuse=f"""
            UPDATE {outbox}
            SET last_error = %s, parked_at = CASE WHEN attempts + 1 >= %s THEN {_NOW} END, attempts = attempts + 1
            WHERE id = %s""",
        refused=f"SELECT attempts, parked_at FROM {outbox} WHERE id = %s",
        parked=f"""
            SELECT message_id, topic, `key`, attempts, last_error, parked_at FROM {outbox}
            WHERE parked_at IS NOT NULL AND sent_at IS NULL
            ORDER BY id LIMIT %s""",
        release_parked=f"UPDATE {outbox} SET parked_at = NULL, attempts = 0 WHERE {parked_one}",
        drop_parked=f"DELETE FROM {outbox} WHERE {parked_one}",
        outbox_counts=f"SELECT count(*) AS pending, count(parked_at) AS parked FROM {outbox} WHERE sent_at IS NULL",
        # SKIP LOCKED: a row a relay holds is pending in its eyes; never wait for it nor delete under it.
        purge_sent_lock=f"""
            SELECT id FROM {outbox} WHERE sent_at IS NOT NULL AND sent_at <= {_NOW} - INTERVAL %s MICROSECOND
            ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED""",
        purge_sent=f"DELETE FROM {outbox} WHERE id IN ({{ids}})",
        # -- the consumer's failures
        # The upsert counts atomically: two consumers of one message each add one (the second waits for the
        # first's row lock); RETURNING reads the row as this statement left it.
        count_failure=f"""
            INSERT INTO {failures} (scope, `key`, attempts, last_error, first_failed_at, last_failed_at)
            VALUES (%s, %s, 1, %s, {_NOW}, {_NOW})
            ON DUPLICATE KEY UPDATE
                attempts = attempts + 1, last_error = VALUES(last_error), last_failed_at = VALUES(last_failed_at)
            RETURNING attempts""",
        forget_failure=f"DELETE FROM {failures} WHERE scope = %s AND `key` = %s",
    )
