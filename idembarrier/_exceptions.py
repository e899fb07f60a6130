"""The exceptions idembarrier raises.

Every exception derives from one root, so ``except IdembarrierError`` catches all of ours and nothing else.
An exception raised by your own code inside a unit of work is never wrapped: it propagates unchanged.

    IdembarrierError
    ├── InvalidKeyError              the key is empty, too long, has control characters or lone surrogates
    ├── InvalidFingerprintError      the fingerprint has no canonical form: not JSON, NaN, too deep (no SQL ran)
    ├── ConfigurationError           the barrier's settings contradict each other (refused at start-up)
    ├── ConflictError                the key's record stands in the way of running the body
    │   ├── KeyInProgressError       a concurrent duplicate holds the key (HTTP 409)
    │   ├── FingerprintMismatchError the key was used for a different request (HTTP 422)
    │   ├── FingerprintVersionError  the key's record was fingerprinted by a version this barrier does not register
    │   ├── ReconciliationRequiredError the key is UNKNOWN: a person must resolve it
    │   ├── ResponseExpiredError     only the compact record remains: the response is past retention
    │   └── LeaseLostError           a lease was taken over or released: its holder may no longer write
    ├── DownstreamError              an outbound call (idembarrier.httpx) got no final answer within its attempts
    │   └── DownstreamDeadlineError  … nor within its deadline
    ├── RecordedFailureError         ``execute()`` met a record whose outcome is FAILED
    ├── ResponseEncodingError        the codec cannot encode or decode a response
    ├── UnitOfWorkError              the unit of work was used against its contract
    ├── SchemaError                  the table is missing or not at the migrations' head
    └── StorageError                 the database failed; classified by SQLSTATE / SQLite error code
        ├── ConnectionLostError      the connection or its backend died (``outcome_unknown``: mid-COMMIT)
        │   └── ConnectError         no connection could be opened: refused, timed out, unreachable (nothing ran)
        ├── PoolTimeoutError         no pooled connection became free within the pool's timeout (nothing ran)
        └── SerializationError       the database aborted the transaction to keep it serializable

Nothing else leaves the public API: a driver's or the pool's own exception (asyncpg's ``InterfaceError``,
SQLAlchemy's ``DBAPIError`` or ``TimeoutError``, a builtin ``OSError``) is always translated, with ``from``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._record import Record

__all__ = [
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "ConnectionLostError",
    "DownstreamDeadlineError",
    "DownstreamError",
    "FingerprintMismatchError",
    "FingerprintVersionError",
    "IdembarrierError",
    "InvalidFingerprintError",
    "InvalidKeyError",
    "KeyInProgressError",
    "LeaseLostError",
    "PoolTimeoutError",
    "ReconciliationRequiredError",
    "RecordedFailureError",
    "ResponseEncodingError",
    "ResponseExpiredError",
    "SchemaError",
    "SerializationError",
    "StorageError",
    "UnitOfWorkError",
]


class IdembarrierError(Exception):
    """Raised for every failure that idembarrier itself detects; the root of the hierarchy."""


class InvalidKeyError(IdembarrierError, ValueError):
    """Raised when a key (or scope) is empty, longer than 255 characters or contains control characters.

    Lone surrogates (text with no UTF-8 encoding, such as ``"\\ud800"``) are refused too. Raised before any SQL
    runs, so an invalid key never reaches the database.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"invalid idempotency key {key[:40]!r}{'…' if len(key) > 40 else ''}: {reason}")
        self.key = key
        self.reason = reason


class InvalidFingerprintError(IdembarrierError, TypeError):
    """Raised when a fingerprint is neither bytes nor a value with a canonical JSON form.

    That is a value of another type, NaN or an infinity, a structure nested too deeply or referring to itself,
    text with a lone surrogate, or a subclass whose own methods raise (the cause is chained). Raised before any
    SQL runs.
    """


class ConfigurationError(IdembarrierError, ValueError):
    """Raised when a barrier's settings are unusable or contradict each other; raised when it is built."""


class ConflictError(IdembarrierError):
    """Raised when the record already stored for a key prevents running the body."""

    def __init__(self, message: str, *, scope: str, key: str, record: Record | None) -> None:
        super().__init__(message)
        self.scope = scope
        self.key = key
        self.record = record


class KeyInProgressError(ConflictError):
    """Raised when a concurrent duplicate holds the key and this call may not (or no longer) wait for it.

    Retrying later is safe: the retry replays the winner's response, or runs if the winner rolled back.
    Maps to HTTP 409 Conflict.
    """

    def __init__(self, *, scope: str, key: str, record: Record | None = None, waited: float = 0.0) -> None:
        how = f"after waiting {waited:.3g} s" if waited else "without waiting"
        super().__init__(
            f"key {key!r} in scope {scope!r} is held by a concurrent request ({how}); retry later",
            scope=scope,
            key=key,
            record=record,
        )
        self.waited = waited


class FingerprintMismatchError(ConflictError):
    """Raised when a key is reused with a request whose fingerprint differs from the recorded one.

    Maps to HTTP 422 Unprocessable Content. ``record`` is the stored record.
    """

    def __init__(self, *, scope: str, key: str, record: Record | None) -> None:
        super().__init__(
            f"key {key!r} in scope {scope!r} was already used for a different request",
            scope=scope,
            key=key,
            record=record,
        )


class FingerprintVersionError(ConflictError):
    """Raised when the key's record was fingerprinted by a version of the fingerprint this barrier does not register.

    The barrier cannot tell a retry from another request, so it does neither. A newer deploy wrote the
    record (register its version before making it current), or the version was unregistered while its
    records could still be retried. ``record.fingerprint_version`` is the version.
    """

    def __init__(self, *, scope: str, key: str, record: Record) -> None:
        super().__init__(
            f"key {key!r} in scope {scope!r} was fingerprinted by version {record.fingerprint_version!r}, "
            "which this barrier does not register",
            scope=scope,
            key=key,
            record=record,
        )


class ReconciliationRequiredError(ConflictError):
    """Raised when the key's record is UNKNOWN: its leased work died too often to be retried blindly.

    A person must find out what happened (``Barrier.unresolved()`` lists such keys) and record the outcome
    with ``Barrier.resolve()``. Maps to HTTP 409.
    """

    def __init__(self, *, scope: str, key: str, record: Record | None) -> None:
        super().__init__(
            f"key {key!r} in scope {scope!r} needs reconciliation: its work died after "
            f"{record.attempt if record else '?'} attempts; resolve it with Barrier.resolve()",
            scope=scope,
            key=key,
            record=record,
        )


class ResponseExpiredError(ConflictError):
    """Raised when a replay finds the key's compact record but its response is past retention.

    The request was made (``record`` says when and how it ended); its response is gone. Under the default
    ``ExpiredReplay.REJECT`` policy nothing runs again. Maps to HTTP 409.
    """

    def __init__(self, *, scope: str, key: str, record: Record | None) -> None:
        super().__init__(
            f"key {key!r} in scope {scope!r} was used already, and its response is past retention",
            scope=scope,
            key=key,
            record=record,
        )


class LeaseLostError(ConflictError):
    """Raised when a lease holder writes after its lease was reclaimed by someone else, or released.

    Nothing was written: the new holder's work stands. ``record`` is the record as this holder last knew it.
    """

    def __init__(self, *, scope: str, key: str, record: Record | None = None) -> None:
        super().__init__(
            f"the lease on key {key!r} in scope {scope!r} was lost (reclaimed or released); nothing was written",
            scope=scope,
            key=key,
            record=record,
        )


class DownstreamError(IdembarrierError):
    """Raised when an outbound call kept its key but got no final answer within its attempts.

    Every attempt failed to connect, lost its connection, timed out, or was answered with a retried status
    (409, 429, 503 by default). ``key`` is the idempotency key every attempt sent: a later retry must send it
    again. ``status`` is the last answer's status (None if the last attempt got none); ``outcome_unknown`` is
    true when an attempt may have reached the other side's application, so that the call may have happened.
    The last attempt's httpx error, if any, is chained (``from``).
    """

    def __init__(
        self, message: str, *, key: str | None, attempts: int, status: int | None, outcome_unknown: bool
    ) -> None:
        super().__init__(message)
        self.key = key
        self.attempts = attempts
        self.status = status
        self.outcome_unknown = outcome_unknown


class DownstreamDeadlineError(DownstreamError):
    """Raised when an outbound call's total deadline passed before a final answer.

    Raised as well, without waiting, when a ``Retry-After`` answer asks to wait past the deadline.
    """


class RecordedFailureError(IdembarrierError):
    """Raised by ``Barrier.execute()`` when the key's recorded outcome is FAILED.

    ``response`` is the failure response recorded with ``UnitOfWork.fail()``; ``replayed`` tells whether it
    was recorded by an earlier call.
    """

    def __init__(self, record: Record, response: object, *, replayed: bool) -> None:
        super().__init__(f"key {record.key!r} in scope {record.scope!r} has a recorded failure")
        self.record = record
        self.response = response
        self.replayed = replayed


class ResponseEncodingError(IdembarrierError):
    """Raised when the codec cannot encode a response (before anything commits) or decode a stored one."""


class UnitOfWorkError(IdembarrierError):
    """Raised when a unit of work is used against its contract, e.g. the body neither completed nor failed.

    Whatever the body wrote is rolled back.
    """


class SchemaError(IdembarrierError):
    """Raised when the records table is missing or not at the head of idembarrier's migrations.

    The message names the command that fixes it.
    """


class StorageError(IdembarrierError):
    """Raised when the database fails; chained (``from``) to the driver's exception.

    ``sqlstate`` is the PostgreSQL SQLSTATE (or ``"sqlite:<code>"`` for SQLite) when the driver gave one.
    Nothing is half-committed: the record and the business writes share one transaction.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class ConnectionLostError(StorageError):
    """Raised when the connection or its server process died during the unit of work.

    ``outcome_unknown`` is true when the connection died while the COMMIT was in flight: the business writes
    and the record may or may not have committed (together). Retrying with the same key is then the only
    safe move: it replays if the commit happened, and runs otherwise. When false, nothing committed.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None, outcome_unknown: bool = False) -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.outcome_unknown = outcome_unknown
        """Whether the COMMIT was in flight when the connection died, so that it may have committed."""


class ConnectError(ConnectionLostError):
    """Raised when no connection to the database could be opened: refused, timed out or unreachable.

    Nothing ran, so ``outcome_unknown`` is false and a retry (with the same key) is safe. The message keeps
    the operating system's reason (``Connection refused``, ``timed out``), read from the error's ``errno``.
    """


class PoolTimeoutError(StorageError):
    """Raised when no pooled connection became free within the pool's timeout (``pool_timeout``).

    Nothing ran. It says the pool is too small for the load, or that connections are held too long.
    """


class SerializationError(StorageError):
    """Raised when the database aborted the transaction (serialization failure, deadlock); retry safely."""
