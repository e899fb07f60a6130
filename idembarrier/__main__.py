"""``python -m idembarrier`` (or ``idembarrier``): the command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 the demo saw phantom writes)."""
    parser = argparse.ArgumentParser(prog="idembarrier", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="send bursts of duplicate payments through the barrier")
    demo.add_argument(
        "--database-url",
        default=os.environ.get("IDEMBARRIER_DATABASE_URL"),
        help="SQLAlchemy async URL (default: IDEMBARRIER_DATABASE_URL, else a temporary SQLite file)",
    )
    demo.add_argument("--orders", type=int, default=20, help="distinct orders (default 20)")
    demo.add_argument("--duplicates", type=int, default=8, help="concurrent copies of each order (default 8)")
    args = parser.parse_args(argv)

    from ._demo import format_report, run_demo

    report = anyio.run(lambda: run_demo(args.database_url, orders=args.orders, duplicates=args.duplicates))
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
