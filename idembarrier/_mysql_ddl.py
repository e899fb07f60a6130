"""The column types idembarrier's migrations give MariaDB and MySQL, and only them.

On PostgreSQL and SQLite each function returns the type the released revisions always used, so what they
create there does not change. On MariaDB/MySQL (a bind whose dialect is ``mysql`` or ``mariadb``):

- keys (``scope``, ``key``, ``record_key``) compare byte for byte, case and trailing spaces included: utf8mb4
  with a binary NO PAD collation (``utf8mb4_nopad_bin`` on MariaDB, ``utf8mb4_0900_bin`` on MySQL 8), where
  the server's default collation would make 'Key-A', 'key-a' and 'Key-A ' one key;
- timestamps keep microseconds (``DATETIME(6)``) and hold UTC: every statement writes ``UTC_TIMESTAMP(6)``,
  the defaults too, whatever the session's time zone;
- bytes and texts have no 64 KiB ceiling (``LONGBLOB``, ``LONGTEXT``): a response as large as PostgreSQL's
  ``bytea`` holds is refused by neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import TextClause
    from sqlalchemy.types import TypeEngine

__all__ = ["blob", "is_mysql", "key", "key_length", "long_text", "now", "timestamp"]


def is_mysql(bind: Connection) -> bool:
    """Whether ``bind`` talks to MariaDB or MySQL."""
    return bind.dialect.name in ("mysql", "mariadb")


def key(bind: Connection, length: int = 255) -> TypeEngine[str]:
    """A key column's type: exact comparison on MariaDB/MySQL (see the module), ``VARCHAR(length)`` elsewhere."""
    if not is_mysql(bind):
        return sa.String(length)
    collation = "utf8mb4_nopad_bin" if getattr(bind.dialect, "is_mariadb", False) else "utf8mb4_0900_bin"
    return mysql.VARCHAR(length, charset="utf8mb4", collation=collation)


def key_length(bind: Connection) -> str:
    """The CHECK on a key's length, in characters (MariaDB's ``length()`` counts bytes)."""
    return "char_length(`key`) BETWEEN 1 AND 255" if is_mysql(bind) else "length(key) BETWEEN 1 AND 255"


def timestamp(bind: Connection) -> TypeEngine[Any]:
    """A timestamp column's type: ``DATETIME(6)`` holding UTC on MariaDB/MySQL."""
    return mysql.DATETIME(fsp=6) if is_mysql(bind) else sa.DateTime(timezone=True)


def now(bind: Connection) -> TextClause | sa.sql.functions.now:
    """A timestamp column's server default: the database's clock, in UTC on MariaDB/MySQL."""
    return sa.text("UTC_TIMESTAMP(6)") if is_mysql(bind) else sa.func.now()


def blob(bind: Connection) -> TypeEngine[bytes]:
    """A bytes column's type: ``LONGBLOB`` on MariaDB/MySQL (a ``BLOB`` stops at 64 KiB)."""
    return mysql.LONGBLOB() if is_mysql(bind) else sa.LargeBinary()


def long_text(bind: Connection) -> TypeEngine[str]:
    """A text column's type: ``LONGTEXT`` on MariaDB/MySQL (a ``TEXT`` stops at 64 KiB)."""
    return mysql.LONGTEXT() if is_mysql(bind) else sa.Text()
