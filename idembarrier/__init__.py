"""idembarrier: idempotent writes that stay idempotent across retries, crashes, races and late replays.

A `Barrier` hands out units of work. Each claims its key with an atomic insert in the same transaction as
the business writes, so the writes and the key's outcome commit, or roll back, together.
"""

from __future__ import annotations

from ._alembic import include_object, include_object_for
from ._barrier import Barrier, Purged, Unresolved
from ._codec import JSON, Codec, DataclassCodec, JSONCodec, PydanticCodec
from ._config import DEFAULT_LEASE, DEFAULT_RECORD_RETENTION, DEFAULT_RETENTION, ExpiredReplay, OnConflict, Retention
from ._engines import create_sqlite_engine
from ._exceptions import (
    ConfigurationError,
    ConflictError,
    ConnectError,
    ConnectionLostError,
    FingerprintMismatchError,
    FingerprintVersionError,
    IdembarrierError,
    InvalidFingerprintError,
    InvalidKeyError,
    KeyInProgressError,
    LeaseLostError,
    PoolTimeoutError,
    ReconciliationRequiredError,
    RecordedFailureError,
    ResponseEncodingError,
    ResponseExpiredError,
    SchemaError,
    SerializationError,
    StorageError,
    UnitOfWorkError,
)
from ._keys import MAX_KEY_LENGTH, FingerprintVersions
from ._lease import Lease, downstream_key
from ._metrics import Outcome, Stats
from ._migrate import check_schema, upgrade
from ._observe import key_hash
from ._privacy import KeyedHash, SealedCodec
from ._reconcile import Provider, ProviderAnswer, ProviderStatus, Reconciled, Reconciliation, Verdict, reconcile
from ._record import Record, Status
from ._uow import UnitOfWork

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_RECORD_RETENTION",
    "DEFAULT_RETENTION",
    "JSON",
    "MAX_KEY_LENGTH",
    "Barrier",
    "Codec",
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "ConnectionLostError",
    "DataclassCodec",
    "ExpiredReplay",
    "FingerprintMismatchError",
    "FingerprintVersionError",
    "FingerprintVersions",
    "IdembarrierError",
    "InvalidFingerprintError",
    "InvalidKeyError",
    "JSONCodec",
    "KeyInProgressError",
    "KeyedHash",
    "Lease",
    "LeaseLostError",
    "OnConflict",
    "Outcome",
    "PoolTimeoutError",
    "Provider",
    "ProviderAnswer",
    "ProviderStatus",
    "Purged",
    "PydanticCodec",
    "Reconciled",
    "Reconciliation",
    "ReconciliationRequiredError",
    "Record",
    "RecordedFailureError",
    "ResponseEncodingError",
    "ResponseExpiredError",
    "Retention",
    "SchemaError",
    "SealedCodec",
    "SerializationError",
    "Stats",
    "Status",
    "StorageError",
    "UnitOfWork",
    "UnitOfWorkError",
    "Unresolved",
    "Verdict",
    "check_schema",
    "create_sqlite_engine",
    "downstream_key",
    "include_object",
    "include_object_for",
    "key_hash",
    "reconcile",
    "upgrade",
]

__version__ = "0.1.0"
