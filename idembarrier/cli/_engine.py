"""The engine the command line, the lab and the demo open on a URL they were given."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._engines import check_url, create_async, create_sqlite_engine

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["create_engine"]


def create_engine(url: str) -> AsyncEngine:
    """Create an engine for ``url``: `create_sqlite_engine` for SQLite, SQLAlchemy's defaults otherwise.

    Raises:
        ConfigurationError: As `check_url`, or the URL's driver is not installed.
    """
    parsed = check_url(url)
    if parsed.get_backend_name() == "sqlite":
        return create_sqlite_engine(url)
    return create_async(url, pool_size=20)
