"""The reason a failure gives, from the driver's or the OS's own fields, and the command line's use of it."""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
from typing import TYPE_CHECKING

import asyncpg
import pytest
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from idembarrier import ConfigurationError, SchemaError, StorageError
from idembarrier.cli import _failure, main
from idembarrier.cli._reason import driver_reason
from tests.helpers import admin_url

if TYPE_CHECKING:
    from collections.abc import Iterator


def _raised_from(cause: BaseException) -> StorageError:
    """A StorageError raised ``from cause``, as our translation raises it."""
    try:
        raise StorageError("reading or writing the records table: the database failed") from cause
    except StorageError as exc:
        return exc


async def test_a_postgresql_error_gives_the_servers_message_and_sqlstate() -> None:
    """asyncpg's ``message`` and ``sqlstate`` fields are the reason, read through our wrapper's cause."""
    server = admin_url()
    with pytest.raises(asyncpg.InvalidCatalogNameError) as caught:
        await asyncpg.connect(
            host=server.host, port=server.port, user=server.username, database="idembarrier_no_such_db"
        )
    reason = driver_reason(_raised_from(caught.value))
    assert reason == 'database "idembarrier_no_such_db" does not exist (SQLSTATE 3D000)'


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 1)"), "Connection refused"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "Name or service not known"),
        (TimeoutError(), "timed out"),
        (
            OSError("Multiple exceptions: [Errno 111] a,\n[Errno 99] b"),
            "Multiple exceptions: [Errno 111] a, [Errno 99] b",
        ),
        (asyncpg.InterfaceError("connection is closed"), "InterfaceError: connection is closed"),
        (PoolTimeoutError("QueuePool limit reached"), "no pooled connection became free in time"),
        (sqlite3.OperationalError("no such table: x"), "no such table: x"),
    ],
)
def test_each_kind_of_cause_gives_its_own_reason_on_one_line(cause: BaseException, reason: str) -> None:
    """OS errors by errno, resolver errors by strerror, a timeout, client and pool errors: one line each."""
    assert driver_reason(_raised_from(cause)) == reason


def test_an_sqlite_error_names_its_result_code() -> None:
    """SQLite's own error name is appended when the driver gives it."""
    with pytest.raises(sqlite3.OperationalError) as caught:
        sqlite3.connect("/nonexistent-dir/x.db")
    assert driver_reason(caught.value) == f"{caught.value} (SQLITE_CANTOPEN)"


def test_a_failure_without_a_driver_cause_has_no_reason() -> None:
    """A chain with nothing from a driver or the OS gives no reason."""
    assert driver_reason(_raised_from(ValueError("x"))) is None


@pytest.fixture
def refused_url() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield admin_url().set(host="127.0.0.1", port=sock.getsockname()[1]).render_as_string(hide_password=False)


def test_main_prints_one_line_and_exits_3_when_the_database_refuses(
    refused_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() returns 3 and prints the OS's reason on one line of stderr."""
    assert main(["stats", "--database-url", refused_url]) == 3
    assert capsys.readouterr().err.splitlines() == [
        f"idembarrier: database {refused_url}: {os.strerror(errno.ECONNREFUSED)}"
    ]


def test_a_group_of_failures_reports_the_most_telling_one() -> None:
    """From a task group's failures, a configuration error (2) is reported before a database one (3)."""
    reset = _raised_from(ConnectionResetError(errno.ECONNRESET, "x"))
    group = ExceptionGroup("burst", [reset, ConfigurationError("c")])
    assert _failure(group, None) == (2, "c")


def test_a_group_holding_a_bug_is_not_reported_as_a_failure() -> None:
    """When any of a group's exceptions is nobody's but ours, main() lets the traceback through."""
    assert _failure(ExceptionGroup("burst", [ConfigurationError("c"), KeyError("bug")]), None) is None


def test_our_other_errors_keep_their_message() -> None:
    """A SchemaError exits 3 with its own message, which names the fix."""
    assert _failure(SchemaError("not installed: run idembarrier migrate"), "sqlite+aiosqlite:///x.db") == (
        3,
        "not installed: run idembarrier migrate",
    )


def test_a_storage_error_without_a_driver_cause_keeps_its_message() -> None:
    """A StorageError with no driver cause reports its own message, on one line."""
    assert _failure(StorageError("the database\nfailed"), None) == (3, "database: the database failed")
