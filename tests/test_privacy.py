"""Privacy at rest: keys stored as keyed hashes, responses sealed; both engines, replays, purge and resolve."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import text

from idembarrier import (
    JSON,
    Barrier,
    ConfigurationError,
    JSONCodec,
    KeyedHash,
    OnConflict,
    ResponseEncodingError,
    Retention,
    SealedCodec,
    Status,
)
from tests._cli import run_async
from tests.helpers import new_key, pay
from tests.test_cli_operations import SCOPE, stale_lease
from tests.test_outbox import Collecting

if TYPE_CHECKING:
    from tests.conftest import Database

SECRET = b"s" * 32
TABLE_TEXT = "SELECT scope, key, response FROM idempotency_keys"


async def stored(db: Database) -> list[tuple[str, str, bytes | None]]:
    """Every record's scope, key and response bytes, as the table holds them."""
    async with db.engine.connect() as conn:
        return [(str(s), str(k), None if r is None else bytes(r)) for s, k, r in await conn.execute(text(TABLE_TEXT))]


async def test_a_hashed_key_is_never_written_and_still_replays(db: Database) -> None:
    """The table holds the HMAC of (scope, key), never the key; retries replay; another scope is another record."""
    barrier, key = Barrier(db.sessionmaker, keyed_hash=KeyedHash(SECRET)), new_key()
    first = await pay(barrier, key)
    assert await pay(barrier, key) == first
    await pay(barrier, key, scope="refunds")
    rows = await stored(db)
    assert len(rows) == 2
    assert all(k.startswith("hmac-sha256:") and len(k) == 55 for _, k, _ in rows)
    assert len({k for _, k, _ in rows}) == 2  # one key in two scopes: two unrelated digests
    assert not any(key in k or key.encode() in (r or b"") for _, k, r in rows)
    assert await db.payments(key) == 2  # once per scope (the body writes the key into its own row)
    assert await pay(Barrier(db.sessionmaker, keyed_hash=KeyedHash(b"t" * 32)), key) != first  # another secret
    assert await db.payments(key) == 3  # is another key space: the key ran again


async def test_concurrent_duplicates_of_a_hashed_key_execute_once(db: Database) -> None:
    """Duplicates lined up together on one hashed key: one execution, one answer."""
    barrier, key = Barrier(db.sessionmaker, keyed_hash=KeyedHash(SECRET)), new_key()
    answers: list[object] = []
    go = anyio.Event()

    async def duplicate() -> None:
        await go.wait()
        answers.append(await pay(barrier, key, on_conflict=OnConflict.WAIT))

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(duplicate)
        await anyio.wait_all_tasks_blocked()
        go.set()
    assert len(answers) == 6
    assert len(set(map(repr, answers))) == 1
    assert await db.payments(key) == 1


async def test_inspect_resolve_and_purge_take_the_original_key(db: Database) -> None:
    """inspect and resolve hash the key they are given; purge applies retention to hashed records as to others."""
    keyed = KeyedHash(SECRET)
    barrier, key = Barrier(db.sessionmaker, keyed_hash=keyed), new_key()
    await stale_lease(db, barrier, key, stored=keyed(SCOPE, key))
    record = await barrier.inspect(key, scope=SCOPE)
    assert record is not None
    assert (record.key, record.status) == (keyed(SCOPE, key), Status.IN_PROGRESS)
    await barrier.resolve(key, scope=SCOPE, status=Status.COMPLETED, response={"charge": "ch_1"})
    assert await pay(barrier, key, scope=SCOPE) == {"charge": "ch_1"}
    assert await db.payments(key) == 0  # resolved by the operator, never run here
    short = Barrier(db.sessionmaker, keyed_hash=keyed, retention=Retention(response=timedelta(0), record=timedelta(0)))
    gone = new_key()
    await pay(short, gone)
    assert (await short.purge()).deleted == 1  # only the record whose retention is over
    assert await short.inspect(gone, scope="payments") is None
    assert await barrier.inspect(key, scope=SCOPE) is not None


async def test_the_outbox_carries_the_hash_not_the_key(db: Database) -> None:
    """A message's idempotency-key header is the stored (hashed) key: the original never reaches the broker."""
    barrier, key = Barrier(db.sessionmaker, keyed_hash=KeyedHash(SECRET)), new_key()
    async with barrier.unit_of_work(key, scope="orders") as uow:
        uow.publish("orders", b"v", key=b"A")
        uow.complete(None)
    publisher = Collecting()
    from idembarrier.kafka import OutboxRelay

    assert await OutboxRelay(barrier, publisher).relay_once() == 1
    [message] = publisher.messages
    headers = dict(message.headers)
    assert headers["idempotency-key"].decode().startswith("hmac-sha256:")
    assert not any(key.encode() in value for value in headers.values())


def test_a_keyed_hash_refuses_a_short_secret_and_never_shows_it() -> None:
    """Fewer than 32 bytes (or a str) is a ConfigurationError; repr hides the secret."""
    for secret in (b"", b"x" * 31, "s" * 32):
        with pytest.raises(ConfigurationError, match="32 bytes"):
            KeyedHash(secret)  # type: ignore[arg-type]
    assert "s" * 32 not in repr(KeyedHash(SECRET))


async def test_a_sealed_response_is_unreadable_at_rest_and_replays(db: Database) -> None:
    """The stored response is a Fernet token, not the JSON; the replay returns the value itself."""
    codec: SealedCodec[JSON] = SealedCodec([SealedCodec.new_key()])
    barrier, key = Barrier(db.sessionmaker, codec=codec), new_key()
    first = await pay(barrier, key)
    assert await pay(barrier, key) == first
    [(_, _, response)] = await stored(db)
    assert response is not None
    assert response.startswith(b"gAAAA")  # Fernet's version byte, base64
    assert JSONCodec().encode(first) not in response


async def test_sealing_keys_rotate_and_an_unknown_or_altered_seal_is_refused(db: Database) -> None:
    """A new key first still opens the old key's records; without that key, or altered: ResponseEncodingError."""
    old, new, stranger = SealedCodec.new_key(), SealedCodec.new_key(), SealedCodec.new_key()
    key = new_key()
    first = await pay(Barrier(db.sessionmaker, codec=SealedCodec([old])), key)
    assert await pay(Barrier(db.sessionmaker, codec=SealedCodec([new, old])), key) == first
    with pytest.raises(ResponseEncodingError):
        await pay(Barrier(db.sessionmaker, codec=SealedCodec([stranger])), key)
    [(_, _, response)] = await stored(db)
    assert response is not None
    rotated = SealedCodec([new, old]).reseal(response)
    assert SealedCodec([new]).decode(rotated) == first  # re-sealed with the new key alone
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE idempotency_keys SET response = :r"), {"r": response[:-2] + b"AA"})
    with pytest.raises(ResponseEncodingError):
        await pay(Barrier(db.sessionmaker, codec=SealedCodec([new, old])), key)
    assert await db.payments(key) == 1


def test_a_sealed_codec_refuses_unusable_keys() -> None:
    """No key, a single key not in a list, or a key that is not Fernet's: ConfigurationError; repr hides them."""
    good = SealedCodec.new_key()
    for keys in ([], good, [b"not a fernet key"]):
        with pytest.raises(ConfigurationError):
            SealedCodec(keys)  # type: ignore[arg-type]
    assert good.decode() not in repr(SealedCodec([good]))


async def test_the_cli_inspects_and_resolves_by_the_original_key(
    db: Database, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--key-secret-env`` names the variable holding the secret; without the variable: exit 2, one line."""
    barrier, key = Barrier(db.sessionmaker, keyed_hash=KeyedHash(SECRET)), new_key()
    await pay(barrier, key)
    monkeypatch.setenv("APP_KEY_SECRET", SECRET.decode())
    command = ("inspect", "payments", key, "--database-url", db.url)
    found = await run_async(capfd, *command, "--key-secret-env", "APP_KEY_SECRET")
    assert found.status == 0, found.err
    assert "COMPLETED" in found.out
    assert "hmac-sha256:" in found.out
    plain = await run_async(capfd, *command)
    assert plain.status == 1  # without the secret the original key names no record
    monkeypatch.delenv("APP_KEY_SECRET")
    missing = await run_async(capfd, *command, "--key-secret-env", "APP_KEY_SECRET")
    assert missing.status == 2
    assert "APP_KEY_SECRET is not set" in missing.line
    assert os.environ.get("APP_KEY_SECRET") is None
