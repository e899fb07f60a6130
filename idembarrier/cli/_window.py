"""``idembarrier check-window``: does each scope keep its records longer than a replay can lag its request?

The replay windows come from a Kafka-protocol broker (``--bootstrap-servers`` and ``--group GROUP=TOPIC,…``:
each topic's ``retention.ms`` and the group's lag) and from declarations (``--declare SCOPE=14d``), which
stand in for what the broker does not expose. The record retentions come from the application's barrier
(``--barrier MODULE:OBJECT``, whose ``max_replay_window`` counts as a declaration for every scope), else from
``--retention SCOPE=30d`` and ``--default-retention``. Exit status: 0 every scope is covered; 1 some are at
risk, listed; 2 bad usage, or a barrier that cannot be loaded; 3 the broker could not be reached.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._config import Retention
from .._exceptions import ConfigurationError
from .._window import Part, ScopeWindow, check, human, read_broker
from ._operator import duration

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import timedelta

__all__ = ["add_parser", "run"]

_Parser = TypeVar("_Parser", bound="argparse.ArgumentParser")


def _pair(kind: str) -> Any:
    """argparse's type for ``NAME=VALUE``, the value read by ``kind`` (a duration, or a list of topics)."""

    def parse(text: str) -> tuple[str, object]:
        name, equals, value = text.partition("=")
        if not equals or not name.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"takes NAME={kind.upper()}, not {text!r}")
        if kind == "topics":
            topics = [t.strip() for t in value.split(",") if t.strip()]
            return name.strip(), topics
        return name.strip(), duration(value)

    return parse


def add_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    """Register ``check-window`` and its options on the command line's subcommands."""
    command = commands.add_parser(
        "check-window", help="compare each scope's record retention with its replay window (exit 1: at risk)"
    )
    command.add_argument("--bootstrap-servers", help="the Kafka-protocol broker, host:port[,host:port]")
    command.add_argument(
        "--group", action="append", default=[], type=_pair("topics"), metavar="GROUP=TOPIC[,TOPIC]",
        help="a consumer group and the topics it consumes (scope consumer:GROUP); repeatable",
    )  # fmt: skip
    command.add_argument(
        "--declare", action="append", default=[], type=_pair("duration"), metavar="SCOPE=DURATION",
        help="the longest a replay may lag in SCOPE, where the broker does not say; repeatable",
    )  # fmt: skip
    command.add_argument("--barrier", help="MODULE:OBJECT, the application's Barrier: its retentions and window")
    command.add_argument(
        "--retention", action="append", default=[], type=_pair("duration"), metavar="SCOPE=DURATION",
        help="a scope's record retention (without --barrier); repeatable",
    )  # fmt: skip
    command.add_argument(
        "--default-retention", type=duration, default=Retention().record,
        help="the record retention of other scopes (without --barrier; default 30d)",
    )  # fmt: skip
    command.add_argument("--timeout", type=float, default=10.0, help="seconds per broker request (default 10)")
    command.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    """``check-window``: 0 every scope covered, 1 some at risk, 2 bad usage, 3 the broker unreachable."""
    try:
        return anyio.run(_run, args)
    except ConfigurationError as exc:
        print(f"idembarrier: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace) -> int:
    groups = dict(args.group)
    declared: dict[str, timedelta] = dict(args.declare)
    if not groups and not declared:
        raise ConfigurationError("name the scopes to check: --group GROUP=TOPIC,... or --declare SCOPE=DURATION")
    if not args.timeout > 0:
        raise ConfigurationError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    if groups and not args.bootstrap_servers:
        raise ConfigurationError("--group needs --bootstrap-servers")
    retention_for, window = _retentions(args)
    parts: dict[str, list[Part]] = {}
    if groups:
        try:
            from aiokafka.errors import KafkaError
        except ImportError:
            raise ConfigurationError(
                "--group reads the broker through aiokafka: pip install 'idembarrier[kafka]'"
            ) from None

        try:
            parts = await read_broker(args.bootstrap_servers, groups, request_timeout=args.timeout)
        except (KafkaError, OSError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            print(f"idembarrier: broker {args.bootstrap_servers}: {reason}", file=sys.stderr)
            return 3
    for scope in {*parts, *declared}:
        read = parts.get(scope, [])
        if scope in declared:  # a declaration stands in for what the broker could not tell
            read = [p for p in read if p.window is not None or p.note != "not readable"]
            read.append(Part("declared", declared[scope]))
        if window is not None:
            read.append(Part("the barrier's max_replay_window", window))
        parts[scope] = read
    checked = check({scope: retention_for(scope) for scope in parts}, parts)
    at_risk = [s for s in checked if s.at_risk]
    if args.json:
        print(json.dumps({"at_risk": [s.scope for s in at_risk], "scopes": [_json(s) for s in checked]}, indent=2))
    else:
        print("\n".join(_text(checked, at_risk)))
    return 1 if at_risk else 0


def _retentions(args: argparse.Namespace) -> tuple[Any, timedelta | None]:
    """The record retention of a scope, and the barrier's declared ``max_replay_window``."""
    if args.barrier is None:
        given: dict[str, timedelta] = dict(args.retention)
        return (lambda scope: given.get(scope, args.default_retention)), None
    from .._barrier import Barrier

    module_name, colon, path = args.barrier.partition(":")
    if not colon or not module_name or not path:
        raise ConfigurationError(f"--barrier takes MODULE:OBJECT, not {args.barrier!r}")
    try:
        found: Any = importlib.import_module(module_name)
        for name in path.split("."):
            found = getattr(found, name)
    except Exception as exc:
        raise ConfigurationError(f"cannot load the barrier {args.barrier!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(found, Barrier):
        raise ConfigurationError(f"{args.barrier!r} is a {type(found).__name__}, not a Barrier")
    options = found.options
    return (lambda scope: options.retention_for(scope).record), options.max_replay_window


def _json(scope: ScopeWindow) -> dict[str, object]:
    return {
        "scope": scope.scope,
        "record_retention_seconds": scope.retention.total_seconds(),
        "window_seconds": None if scope.window is None else scope.window.total_seconds(),
        "at_risk": scope.at_risk,
        "reason": scope.reason,
        "parts": [
            {
                "source": p.source,
                "window_seconds": None if p.window is None else p.window.total_seconds(),
                "note": p.note,
            }
            for p in scope.parts
        ],
    }


def _text(checked: Sequence[ScopeWindow], at_risk: Sequence[ScopeWindow]) -> list[str]:
    rows = [(s.scope, human(s.retention), human(s.window), "AT RISK" if s.at_risk else "ok", s.reason) for s in checked]
    header = ("SCOPE", "RETENTION", "WINDOW", "STATUS", "WHY")
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    table = ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)]
    if at_risk:
        first = f"{len(at_risk)} of {len(checked)} scopes at risk: a replay may come after its record is gone"
    else:
        first = f"{len(checked)} scopes checked: every record retention covers its replay window"
    return [first, *table]
