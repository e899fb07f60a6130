"""The operator's commands over a records table: ``inspect``, ``unresolved``, ``resolve`` and the outbox's
parked messages (``parked``, ``release-parked``, ``drop-parked``), through the public API only.

A listing that finds something a person must act on (``unresolved``, ``parked``) exits 1, so a scheduler can
alert on the status alone. A refusal (``resolve`` while a live lease holds the key, or of a key with no
record or a finished one; releasing or dropping a message that is not parked) exits 1 with one line on
stderr: the database answered, the record's state forbids the action.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NoReturn

from .._record import Status

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from .._barrier import Barrier
    from .._codec import JSON
    from .._outbox import Message
    from .._record import Record
    from .._relay import OutboxRelay

__all__ = [
    "drop_parked",
    "emit",
    "inspect",
    "iso",
    "json_value",
    "parked",
    "positive",
    "release_parked",
    "resolve",
    "unresolved",
]


def positive(text: str) -> int:
    """argparse's type for ``--limit``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def json_value(text: str) -> JSON:
    """argparse's type for ``--response``: one JSON value (NaN and Infinity are not JSON, so refused)."""

    def refuse(constant: str) -> NoReturn:
        raise ValueError(f"{constant} is not JSON")

    try:
        value: JSON = json.loads(text, parse_constant=refuse)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a JSON value ({exc}): {text!r}") from None
    return value


def emit(args: argparse.Namespace, data: Mapping[str, object], text: str) -> int:
    """Print ``data`` as JSON under ``--json``, else ``text``; return 0."""
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def refuse(line: str) -> int:
    """Print the one line of a refusal on stderr; return its exit status, 1."""
    print(f"idembarrier: {line}", file=sys.stderr)
    return 1


def iso(value: datetime | timedelta | None) -> str | None:
    """A timestamp as ISO 8601, an interval as ``H:MM:SS``, ``None`` as is."""
    return None if value is None else str(value) if isinstance(value, timedelta) else value.isoformat()


def _age(age: timedelta) -> str:
    """An age to the second (``2 days, 3:04:05``): an operator does not reconcile by the microsecond."""
    return str(timedelta(seconds=round(age.total_seconds())))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, as wide as their widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)
    ]


def _count(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _more(count: int, limit: int) -> list[str]:
    return [f"(the oldest {limit} shown: there may be more; raise --limit)"] if count == limit else []


# -- records -------------------------------------------------------------------------------------------


def _state(record: Record) -> dict[str, object]:
    """The fields that mean something in the record's state, and only those."""
    data: dict[str, object] = {
        "found": True,
        "scope": record.scope,
        "key": record.key,
        "status": record.status.value,
        "attempt": record.attempt,
        "fingerprint": None if record.fingerprint is None else record.fingerprint.hex(),
        "created_at": iso(record.created_at),
    }
    if record.status.finished:
        data["completed_at"] = iso(record.completed_at)
        data["expires_at"] = iso(record.expires_at)
        data["compact"] = record.compact
        data["response"] = None if record.response is None else record.response.decode(errors="replace")
    else:  # leased work in flight, or given up on: where its lease and its progress stand
        data["locked_until"] = iso(record.locked_until)
        if record.status is Status.IN_PROGRESS:
            data["stale"] = record.stale
        data["checkpoint"] = record.checkpoint
    return data


def _notes(record: Record) -> list[str]:
    """What the state means for an operator, in words."""
    if record.compact:
        return ["its response is gone (compact record, past its response retention); the key still replays as made"]
    if record.status is Status.UNKNOWN:
        return ["its leased work died too often: find out what happened, then `idembarrier resolve`"]
    if record.status is not Status.IN_PROGRESS:
        return []
    if record.stale:  # read only here: the row's stale is also true of a finished record whose lease ran out
        return ["its lease ran out: the next claim reclaims it, or `idembarrier resolve` records an outcome"]
    return ["a live lease holds it: it may still finish by itself"]


async def inspect(barrier: Barrier[JSON], args: argparse.Namespace) -> int:
    """``inspect SCOPE KEY``: one record, with only the fields its state gives meaning to; exit 1 if none."""
    record = await barrier.inspect(args.key, scope=args.scope)
    if record is None:
        emit(args, {"found": False}, f"no record for key {args.key!r} in scope {args.scope!r}")
        return 1
    data = _state(record)
    shown = {name: "(none)" if value is None else value for name, value in data.items() if name != "found"}
    if record.compact:
        shown["response"] = "(gone)"
    lines = [f"  {name:<14}{value}" for name, value in shown.items()]
    return emit(args, data, "\n".join([*lines, *(f"  -> {note}" for note in _notes(record))]))


async def unresolved(barrier: Barrier[JSON], args: argparse.Namespace) -> int:
    """``unresolved``: UNKNOWN records and stale leases, oldest first; exit 1 when there are any."""
    found = await barrier.unresolved(limit=args.limit)
    data = {
        "unresolved": [
            {
                "scope": u.record.scope,
                "key": u.record.key,
                "status": u.record.status.value,
                "attempt": u.record.attempt,
                "age_seconds": u.age.total_seconds(),
                "created_at": iso(u.record.created_at),
                "locked_until": iso(u.record.locked_until),
                "checkpoint": u.record.checkpoint,
            }
            for u in found
        ],
        "limit": args.limit,
    }
    if not found:
        return emit(args, data, "no unresolved keys")
    rows = [
        (
            u.record.scope,
            u.record.key,
            "UNKNOWN" if u.record.status is Status.UNKNOWN else "stale lease",
            str(u.record.attempt),
            _age(u.age),
            u.record.checkpoint or "-",
        )
        for u in found
    ]
    header = ("SCOPE", "KEY", "STATUS", "ATTEMPT", "AGE", "CHECKPOINT")
    emit(
        args,
        data,
        "\n".join(
            [
                _count(len(found), "key needs", "keys need") + " a person, oldest first:",
                *_table(header, rows),
                *_more(len(found), args.limit),
            ]
        ),
    )
    return 1


async def resolve(barrier: Barrier[JSON], args: argparse.Namespace) -> int:
    """``resolve SCOPE KEY --status … --response …``: an operator's outcome; exit 1 when refused."""
    from .._exceptions import ConflictError, KeyInProgressError

    status = Status(args.status)
    try:
        await barrier.resolve(args.key, scope=args.scope, status=status, response=args.response)
    except KeyInProgressError as exc:
        until = "" if exc.record is None else f" until {iso(exc.record.locked_until)}"
        return refuse(
            f"cannot resolve key {args.key!r} in scope {args.scope!r}: a live lease holds it{until} "
            "and may still finish by itself; resolve it once the lease has run out"
        )
    except ConflictError as exc:
        return refuse(f"cannot resolve: {exc}")
    data = {"resolved": True, "scope": args.scope, "key": args.key, "status": status.value}
    return emit(args, data, f"resolved key {args.key!r} in scope {args.scope!r} as {status.value}")


# -- the outbox's parked messages ----------------------------------------------------------------------


class _NoPublisher:
    """The publisher of a relay that only lists, releases and drops parked messages: it never publishes."""

    async def publish(self, messages: Sequence[Message]) -> None:
        raise RuntimeError("the command line never publishes")  # pragma: no cover - nothing calls it


def _relay(barrier: Barrier[JSON]) -> OutboxRelay:
    from .._relay import OutboxRelay

    return OutboxRelay(barrier, _NoPublisher())


def _flat(text: str | None, width: int = 80) -> str:
    """An error on one line, cut to ``width``."""
    line = " ".join((text or "-").split())
    return line if len(line) <= width else line[: width - 1] + "…"


async def parked(barrier: Barrier[JSON], args: argparse.Namespace) -> int:
    """``parked``: the outbox's parked messages, oldest first; exit 1 when there are any."""
    found = await _relay(barrier).parked(limit=args.limit)
    data = {
        "parked": [
            {
                "message_id": p.message_id,
                "topic": p.topic,
                "key": None if p.key is None else p.key.decode(errors="replace"),
                "attempts": p.attempts,
                "last_error": p.last_error,
                "parked_at": iso(p.parked_at),
            }
            for p in found
        ],
        "limit": args.limit,
    }
    if not found:
        return emit(args, data, "no parked messages")
    rows = [
        (
            p.message_id,
            p.topic,
            "-" if p.key is None else p.key.decode(errors="replace"),
            str(p.attempts),
            iso(p.parked_at) or "-",
            _flat(p.last_error),
        )
        for p in found
    ]
    header = ("MESSAGE_ID", "TOPIC", "KEY", "ATTEMPTS", "PARKED_AT", "LAST_ERROR")
    lines = [
        _count(len(found), "parked message", "parked messages") + " (each key's later messages wait behind it):",
        *_table(header, rows),
    ]
    emit(args, data, "\n".join([*lines, *_more(len(found), args.limit)]))
    return 1


async def release_parked(barrier: Barrier[JSON], args: argparse.Namespace) -> int:
    """``release-parked MESSAGE_ID``: publish it again, its refusals from 0; exit 1 if it is not parked."""
    if not await _relay(barrier).release(args.message_id):
        return refuse(f"message {args.message_id!r} is not parked: nothing released")
    data = {"released": True, "message_id": args.message_id}
    return emit(args, data, f"released message {args.message_id!r}: the relay publishes it next")


async def drop_parked(barrier: Barrier[JSON], args: argparse.Namespace) -> int:
    """``drop-parked MESSAGE_ID``: delete it for good, letting its key's later messages go; exit 1 if not parked."""
    if not await _relay(barrier).drop(args.message_id):
        return refuse(f"message {args.message_id!r} is not parked: nothing dropped")
    data = {"dropped": True, "message_id": args.message_id}
    return emit(args, data, f"dropped message {args.message_id!r}: it will never be published")
