"""The operator's commands over a records table: ``list``, ``inspect``, ``unresolved``, ``resolve`` and the
outbox's parked messages (``parked``, ``release-parked``, ``drop-parked``), through the public API only.

Text output escapes what a terminal would act on in keys, scopes and checkpoints (`printable`); ``--json``
gives them exactly. A listing that finds something a person must act on (``unresolved``, ``parked``) exits
1, so a scheduler can alert on the status alone; ``list`` only lists, and exits 0. A refusal (``resolve``
while a live lease holds the key, or of a key with no record or a finished one; releasing or dropping a
message that is not parked) exits 1 with one line on stderr: the database answered, the record's state
forbids the action.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
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
    "LIST_LIMIT",
    "drop_parked",
    "duration",
    "emit",
    "inspect",
    "iso",
    "json_value",
    "list_limit",
    "list_records",
    "parked",
    "positive",
    "printable",
    "release_parked",
    "resolve",
    "statuses",
    "unresolved",
]

LIST_LIMIT = 10_000
"""The most records ``list`` prints: past that, narrow the filters (or page with ``--older-than``)."""

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|[smhdw])")


def share(text: str) -> float:
    """argparse's type for ``--max-share``: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, not {text}")
    return value


def positive(text: str) -> int:
    """argparse's type for ``--limit``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def list_limit(text: str) -> int:
    """argparse's type for ``list --limit``: a whole number from 1 to `LIST_LIMIT`."""
    value = positive(text)
    if value > LIST_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {LIST_LIMIT}, not {value}: narrow the filters instead")
    return value


def duration(text: str) -> timedelta:
    """argparse's type for a duration: ``90s``, ``30m``, ``2h``, ``7d``, ``1w``, ``1h30m``, ``250ms``, ``1.5h``; a
    bare number is seconds."""
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
        text += "s"
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration like 30m, 2h or 7d: {text!r}")
    try:
        return sum((timedelta(seconds=float(number) * _UNITS[unit]) for number, unit in parts), timedelta(0))
    except (OverflowError, ValueError):  # past timedelta's range, or past float's
        raise argparse.ArgumentTypeError(f"too long a duration: {text!r}") from None


def statuses(text: str) -> list[Status]:
    """argparse's type for ``--status``: one status or a comma-separated list of them, in any case."""
    try:
        return [Status(name.strip().upper()) for name in text.split(",")]
    except ValueError:
        names = ", ".join(s.value for s in Status)
        raise argparse.ArgumentTypeError(f"not a status (choose from {names}): {text!r}") from None


def printable(text: str) -> str:
    """``text`` with what a terminal would act on escaped: ``\\x1b``, ``\\u202e``, ``\\n``….

    Control and format characters (bidirectional overrides among them) and separators other than the
    space: the barrier refuses control characters in keys, but not format characters, and a row written
    around it may hold anything.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


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
    if record.status.finished:  # its two horizons: the response's, then the record's own
        data["completed_at"] = iso(record.completed_at)
        data["response_expires_at"] = iso(record.response_expires_at)
        data["expires_at"] = iso(record.expires_at)
        data["compact"] = record.compact
        data["response"] = None if record.response is None else record.response.decode(errors="replace")
    elif record.status is Status.IN_PROGRESS:  # leased work in flight: where its lease and its progress stand
        data["locked_until"] = iso(record.locked_until)
        data["stale"] = record.stale
        data["checkpoint"] = record.checkpoint
    else:  # UNKNOWN: given up on, no lease and no horizon; it stays until a person resolves it
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
    shown = {
        name: "(none)" if value is None else printable(value) if isinstance(value, str) else value
        for name, value in data.items()
        if name != "found"
    }
    if record.compact:
        shown["response"] = "(gone)"
    lines = [f"  {name:<21}{value}" for name, value in shown.items()]
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
            printable(u.record.scope),
            printable(u.record.key),
            "UNKNOWN" if u.record.status is Status.UNKNOWN else "stale lease",
            str(u.record.attempt),
            _age(u.age),
            printable(u.record.checkpoint or "-"),
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


def _listed(record: Record) -> dict[str, object]:
    """One record of ``list --json``: the same fields for every record, ``null`` where its state has none."""
    return {
        "scope": record.scope,
        "key": record.key,
        "status": record.status.value,
        "stale": record.stale,
        "compact": record.compact,
        "attempt": record.attempt,
        "fingerprint": None if record.fingerprint is None else record.fingerprint.hex(),
        "created_at": iso(record.created_at),
        "completed_at": iso(record.completed_at),
        "response_expires_at": iso(record.response_expires_at),
        "expires_at": iso(record.expires_at),
        "locked_until": iso(record.locked_until),
        "checkpoint": record.checkpoint,
    }


def _when(value: datetime | None) -> str:
    """A timestamp in UTC to the second, for a table: ``2026-12-02T04:31:48Z``."""
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(record: Record) -> str:
    if record.stale:
        return "IN_PROGRESS(stale)"
    return f"{record.status.value}(compact)" if record.compact else record.status.value


async def list_records(barrier: Barrier[JSON], args: argparse.Namespace) -> int:
    """``list``: records by status, scope and age, newest first, up to ``--limit``; exit 0."""
    wanted = None if args.status is None else list(dict.fromkeys(args.status))
    found = await barrier.records(
        status=wanted, scope=args.scope, older_than=args.older_than, newer_than=args.newer_than, limit=args.limit + 1
    )
    more, found = len(found) > args.limit, found[: args.limit]
    data = {
        "records": [_listed(record) for record in found],
        "limit": args.limit,
        "more": more,
        "filters": {
            "status": None if wanted is None else [status.value for status in wanted],
            "scope": args.scope,
            "older_than_seconds": None if args.older_than is None else args.older_than.total_seconds(),
            "newer_than_seconds": None if args.newer_than is None else args.newer_than.total_seconds(),
        },
    }
    if not found:
        return emit(args, data, "no records match")
    rows = [
        (
            printable(r.scope),
            printable(r.key),
            _status(r),
            str(r.attempt),
            _when(r.created_at),
            _when(r.locked_until if r.status is Status.IN_PROGRESS else r.expires_at),
        )
        for r in found
    ]
    header = ("SCOPE", "KEY", "STATUS", "ATTEMPT", "CREATED_AT", "UNTIL")
    lines = [_count(len(found), "record", "records") + ", newest first:", *_table(header, rows)]
    if more:
        lines.append(f"(the newest {args.limit} shown: there are more; raise --limit or narrow the filters)")
    return emit(args, data, "\n".join(lines))


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
