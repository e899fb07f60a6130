"""The test session's PostgreSQL: the configured server where it answers, an embedded one where it does not."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import anyio.to_thread
import asyncpg
import pytest

from tests import _postgres_server
from tests._postgres_server import FORCE_VARIABLE, URL_VARIABLE, answers, server_for, session_url
from tests.conftest import ADMIN_URL

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import URL


@pytest.fixture
def closed_url() -> Iterator[URL]:
    """The session's URL with the port of a bound socket that does not listen: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield ADMIN_URL.set(host="127.0.0.1", port=sock.getsockname()[1])


def test_a_url_that_answers_is_kept() -> None:
    """Where PostgreSQL answers at the URL, the session uses it and starts nothing."""
    assert server_for(ADMIN_URL, force=False) == (ADMIN_URL, None)


async def test_a_url_that_does_not_answer_gets_an_embedded_superuser_server(closed_url: URL) -> None:
    """Nothing answers: an embedded server starts on a free port with the URL's user and database, then stops."""
    assert not answers(closed_url)
    url, server = await anyio.to_thread.run_sync(lambda: server_for(closed_url, force=False))
    assert server is not None
    try:
        assert (url.drivername, url.username, url.host, url.database) == (
            closed_url.drivername,
            closed_url.username,
            "127.0.0.1",
            closed_url.database,
        )
        assert url.port != closed_url.port
        conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=url.database)
        try:
            assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is True
        finally:
            await conn.close()
    finally:
        await anyio.to_thread.run_sync(server.stop)
    assert not answers(url)
    assert not server.directory.exists()


def test_the_flag_forces_an_embedded_server_and_the_session_exports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the flag set, a URL that answers is passed over; its URL is exported for the tests' subprocesses."""
    monkeypatch.setenv(URL_VARIABLE, ADMIN_URL.render_as_string(hide_password=False))
    monkeypatch.setenv(FORCE_VARIABLE, "1")
    monkeypatch.setattr(_postgres_server, "started", None)
    url = session_url()
    server = _postgres_server.started
    assert server is not None
    try:
        assert url == server.url != ADMIN_URL
        assert os.environ[URL_VARIABLE] == url.render_as_string(hide_password=False)
        assert FORCE_VARIABLE not in os.environ
        assert answers(url)
    finally:
        server.stop()
