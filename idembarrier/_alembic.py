"""Coexisting with an application's own Alembic: keep its autogenerate off idembarrier's tables.

An application's ``alembic revision --autogenerate`` compares the database with the application's metadata.
idembarrier's tables are in the database but not in that metadata, so without a filter autogenerate proposes
``op.drop_table("idempotency_keys")`` (and the outbox, the failures and the version table): applied, the
deduplication is gone. Pass `include_object` (or `include_object_for` a renamed records table) to
``context.configure`` in the application's ``env.py``.

The filter knows idembarrier's tables by name, derived from the same declaration the migrations are checked
against (`records_table`), so a table idembarrier adds later is covered without a change here. Names rather
than a marker in the database: a table comment would need every installed schema migrated first, and could
not mark the version table Alembic itself creates; guessing from the columns could hide an application table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import MetaData, Table

from ._config import DEFAULT_TABLE
from ._schema import VERSION_TABLE, records_table

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.sql.schema import SchemaItem

__all__ = ["include_object", "include_object_for", "owned_tables"]


def owned_tables(table: str = DEFAULT_TABLE) -> frozenset[str]:
    """The names of the tables idembarrier owns for the records table ``table``, its version table included."""
    metadata = MetaData()
    records_table(metadata, table)
    return frozenset({*(t.name for t in metadata.tables.values()), VERSION_TABLE})


def include_object_for(
    *, table: str = DEFAULT_TABLE, schema: str | None = None
) -> Callable[[SchemaItem, str | None, str, bool, SchemaItem | None], bool]:
    """Return an Alembic ``include_object`` hook that leaves out idembarrier's tables.

    Args:
        table: The records table's name, as given to `Barrier` and `upgrade`.
        schema: Its PostgreSQL schema; ``None`` for the default one (which Alembic reports as ``None``).

    The hook answers ``False`` for idembarrier's tables (records, ``<table>_outbox``, ``<table>_failures``,
    ``idembarrier_alembic_version``) in that schema and for their columns, indexes and constraints, and
    ``True`` for everything else. Combine it with a filter of your own as
    ``lambda *args: ours(*args) and yours(*args)``.
    """
    names = owned_tables(table)

    def include_object(
        obj: SchemaItem, name: str | None, type_: str, reflected: bool, compare_to: SchemaItem | None
    ) -> bool:
        owner = obj if type_ == "table" else getattr(obj, "table", None)
        return not (isinstance(owner, Table) and owner.name in names and owner.schema == schema)

    include_object.__doc__ = f"Leave idembarrier's tables for {table!r} out of autogenerate."
    return include_object


include_object = include_object_for()
"""The ``include_object`` hook for the default records table (``idempotency_keys`` in the default schema).

In an application's ``env.py``: ``context.configure(..., include_object=idembarrier.include_object)``.
"""
