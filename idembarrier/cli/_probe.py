"""``idembarrier probe URL``: a black-box check of an HTTP API's ``Idempotency-Key`` behaviour.

The probe sends a few requests to the one URL it is given (and to the count endpoint, on the same origin,
when one is named), within a request budget and a rate limit, and reports one verdict per clause: pass,
fail or not applicable. Its requests have effects: point it at a test deployment, never at production.

Exit status: 0 every MUST clause passed; 1 one failed; 2 bad usage, or a target that refuses the probe's
request; 3 the target could not be reached. A failure prints one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, TypeVar

import anyio

if TYPE_CHECKING:
    import argparse

    from ._probe_target import Target

_Parser = TypeVar("_Parser", bound="argparse.ArgumentParser")

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    """Register ``probe`` and its options on the command line's subcommands."""
    command = commands.add_parser("probe", help="check an HTTP API's Idempotency-Key behaviour, clause by clause")
    command.add_argument("url", help="the idempotent endpoint, e.g. http://127.0.0.1:8000/payments")
    command.add_argument("-X", "--method", default="POST", help="default POST")
    command.add_argument("-d", "--data", default='{"amount": 1000}', help="the request body (JSON by default)")
    command.add_argument("--other-data", help="another body the API accepts (default: --data with a value changed)")
    command.add_argument("-H", "--header", action="append", default=[], help="'Name: value' sent on every request")
    command.add_argument("--credential", help="'Name: value' of the first principal (an Authorization header)")
    command.add_argument("--other-credential", help="'Name: value' of a second principal: checks key scoping")
    command.add_argument("--key-header", default="Idempotency-Key", help="default Idempotency-Key")
    command.add_argument("--bare-keys", action="store_true", help="send keys unquoted, not as sf-strings")
    command.add_argument("--key-optional", action="store_true", help="the API runs requests without a key")
    command.add_argument("--id-field", help="the answer's JSON field (dotted) that names the resource created")
    command.add_argument("--count-url", help="a GET on the same origin that counts the effects (number/list/count)")
    command.add_argument("--fail-header", help="'Name: value' that makes the target fail with a 5xx")
    command.add_argument("--replay-header", help="the API's replay marker (default: the usual names)")
    command.add_argument("--concurrency", type=int, default=5, help="concurrent duplicates (default 5)")
    command.add_argument("--budget", type=int, default=60, help="most requests sent (default 60)")
    command.add_argument("--rate", type=float, default=20.0, help="most requests a second (default 20)")
    command.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    command.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _header(value: str | None, option: str) -> tuple[str, str] | None:
    from ._probe_target import ProbeUsageError

    if value is None:
        return None
    name, colon, text = value.partition(":")
    if not colon or not name.strip() or not name.strip().isascii() or " " in name.strip():
        raise ProbeUsageError(f"{option} takes 'Name: value', not {value!r}")
    return name.strip(), text.strip()


def target_of(args: argparse.Namespace) -> Target:
    """The `Target` that the command line's options describe."""
    import httpx

    from ._probe_target import ProbeUsageError, Target, other_body

    try:
        url = httpx.URL(args.url)
        count_url = None if args.count_url is None else url.join(args.count_url)
    except httpx.InvalidURL as exc:
        raise ProbeUsageError(f"not a URL: {exc}") from exc
    body = args.data.encode()
    other = other_body(body) if args.other_data is None else args.other_data.encode()
    return Target(
        url=url,
        method=args.method.upper(),
        body=body,
        other_body=other,
        headers=tuple(h for h in (_header(v, "--header") for v in args.header) if h is not None),
        credential=_header(args.credential, "--credential"),
        other_credential=_header(args.other_credential, "--other-credential"),
        key_header=args.key_header,
        key_style="bare" if args.bare_keys else "quoted",
        key_required=not args.key_optional,
        id_field=args.id_field,
        count_url=count_url,
        fail_header=_header(args.fail_header, "--fail-header"),
        replay_header=args.replay_header,
        concurrency=args.concurrency,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``idembarrier probe``; return the exit status."""
    try:
        import httpx  # noqa: F401 - the probe's one dependency, in the ``probe`` extra
    except ImportError:  # pragma: no cover - the tests run where httpx is installed
        print("idembarrier: probe needs httpx: pip install 'idembarrier[probe]'", file=sys.stderr)
        return 2
    from ._probe_http import TargetUnreachableError
    from ._probe_report import format_report, probe
    from ._probe_target import ProbeUsageError

    try:
        if args.budget < 1 or args.rate <= 0 or args.timeout <= 0:
            raise ProbeUsageError("--budget, --rate and --timeout must be positive")
        target = target_of(args)
        report = anyio.run(lambda: probe(target, budget=args.budget, rate=args.rate, answer_within=args.timeout))
    except ProbeUsageError as exc:
        print(f"idembarrier: probe: {exc}", file=sys.stderr)
        return 2
    except TargetUnreachableError as exc:
        print(f"idembarrier: probe: the target could not be reached: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1
