"""The entry point: a `Barrier` hands out units of work over one records table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic

from typing_extensions import TypeVar

from ._codec import JSON, Codec, JSONCodec
from ._config import DEFAULT_RETENTION, OnConflict, Options, check_retention, check_wait_timeout
from ._exceptions import RecordedFailureError
from ._keys import fingerprint_digest, validate_key
from ._migrate import check_schema_on
from ._record import Status
from ._storage import Storage, TableName, open_storage
from ._uow import UnitOfWork

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import timedelta

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

__all__ = ["Barrier"]

R = TypeVar("R", default=JSON)


class Barrier(Generic[R]):
    """Makes writes idempotent: one record per (scope, key), committed with the business writes.

    Args:
        sessionmaker: Opens the sessions of units of work that are not given one.
        codec: Encodes responses for their records (default: JSON values).
        table: Name of the records table.
        schema: PostgreSQL schema of the records table.
        on_conflict: What a concurrent duplicate does by default: wait for the holder, or fail fast.
        wait_timeout: Longest wait for a concurrent holder, in seconds.
        retention: How long finished records are kept before cleanup may delete them.
        check_schema: On first use, raise `SchemaError` unless the table is at the migrations' head.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        codec: Codec[R] | None = None,
        table: str = "idempotency_keys",
        schema: str | None = None,
        on_conflict: OnConflict = OnConflict.WAIT,
        wait_timeout: float = 10.0,
        retention: timedelta = DEFAULT_RETENTION,
        check_schema: bool = True,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.codec: Codec[R] = codec if codec is not None else JSONCodec()  # type: ignore[assignment]
        self.options = Options(
            table=table,
            schema=schema,
            on_conflict=on_conflict,
            wait_timeout=wait_timeout,
            retention=retention,
            check_schema=check_schema,
        )
        self._table = TableName(table, schema)
        self._schema_checked = not check_schema

    def unit_of_work(
        self,
        key: str,
        *,
        scope: str,
        fingerprint: object = None,
        session: AsyncSession | None = None,
        on_conflict: OnConflict | None = None,
        wait_timeout: float | None = None,
        retention: timedelta | None = None,
    ) -> UnitOfWork[R]:
        """Return the unit of work for ``key`` in ``scope``, to be entered with ``async with``.

        Args:
            key: The idempotency key: 1-255 characters, no control characters.
            scope: Namespace of the key (tenant, operation…); the same key in two scopes is two records.
            fingerprint: The request (bytes or a JSON value), hashed; a replay with another one raises
                `FingerprintMismatchError`. ``None``: the key alone identifies the request.
            session: Join this session's transaction instead of opening one. The barrier then never
                commits: on a clean exit the record and the body's writes are left in the caller's
                transaction (inside a released savepoint) for the caller to commit or roll back; if the
                body raises, the savepoint is rolled back and the caller's transaction stays usable.
            on_conflict: Overrides the barrier's choice for a concurrent duplicate.
            wait_timeout: Overrides the barrier's longest wait, in seconds.
            retention: Overrides how long this record is kept once finished.

        Raises:
            InvalidKeyError: The key or scope is unusable; raised here, before any SQL.
            InvalidFingerprintError: The fingerprint is neither bytes nor a JSON value.
        """
        return UnitOfWork(
            self,
            key=validate_key(key),
            scope=validate_key(scope, what="scope"),
            fingerprint=fingerprint_digest(fingerprint),
            session=session,
            on_conflict=self.options.on_conflict if on_conflict is None else OnConflict(on_conflict),
            wait_timeout=self.options.wait_timeout if wait_timeout is None else check_wait_timeout(wait_timeout),
            retention=self.options.retention if retention is None else check_retention(retention),
            codec=self.codec,
        )

    async def execute(
        self,
        key: str,
        handler: Callable[[AsyncSession], Awaitable[R]],
        *,
        scope: str,
        fingerprint: object = None,
        session: AsyncSession | None = None,
        on_conflict: OnConflict | None = None,
        wait_timeout: float | None = None,
        retention: timedelta | None = None,
    ) -> R:
        """Run ``handler(session)`` once per key and return its response; replays return the stored one.

        The handler does the business writes through the session it is given and returns the response,
        which is recorded as COMPLETED in the same transaction. Takes the options of `unit_of_work`.

        Raises:
            RecordedFailureError: The key's recorded outcome is FAILED (recorded with `UnitOfWork.fail`).
        """
        async with self.unit_of_work(
            key,
            scope=scope,
            fingerprint=fingerprint,
            session=session,
            on_conflict=on_conflict,
            wait_timeout=wait_timeout,
            retention=retention,
        ) as uow:
            if not uow.replayed:
                uow.complete(await handler(uow.session))
        if uow.record is not None and uow.record.status is Status.FAILED:
            raise RecordedFailureError(uow.record, uow.response, replayed=True)
        return uow.response

    async def storage(self, conn: AsyncConnection) -> Storage:
        """Return the records table's storage on ``conn``, checking the schema on first use."""
        if not self._schema_checked:
            await check_schema_on(conn, schema=self._table.schema)
            self._schema_checked = True
        return await open_storage(conn, self._table)
