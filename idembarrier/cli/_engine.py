"""The engine the command line, the lab and the demo open on a URL they were given."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._engines import check_url, create_async, create_sqlite_engine
from .._poolers import SAFE_CONNECT_ARGS

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["create_engine"]


def create_engine(url: str) -> AsyncEngine:
    """Create an engine for ``url``: `create_sqlite_engine` for SQLite, else SQLAlchemy's with no statement cache.

    A command sends few statements, so it keeps none prepared in the server's session (`SAFE_CONNECT_ARGS`):
    it works through a transaction pooler as well as directly.

    Raises:
        ConfigurationError: As `check_url`, or the URL's driver is not installed.
    """
    parsed = check_url(url)
    if parsed.get_backend_name() == "sqlite":
        return create_sqlite_engine(url)
    return create_async(url, pool_size=20, connect_args=dict(SAFE_CONNECT_ARGS.get(parsed.drivername, {})))
