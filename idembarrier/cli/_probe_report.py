"""The probe's run over its clauses, and its report.

`probe` sends the first request, then runs each check in turn while the request budget affords it; a
check the budget cannot afford reports its clauses as not applicable rather than sending a partial sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from ._probe_checks import CHECKS, Level, Result, Verdict
from ._probe_http import BudgetExhaustedError, Sender
from ._probe_target import Probe, Target

__all__ = ["Report", "format_report", "probe"]


@dataclass(frozen=True)
class Report:
    """A probe's verdicts, clause by clause."""

    url: str
    results: list[Result]
    requests: int

    @property
    def ok(self) -> bool:
        """Whether no MUST clause failed."""
        return not any(r.verdict is Verdict.FAIL and r.clause.level is Level.MUST for r in self.results)

    def verdicts(self) -> dict[str, str]:
        """Each clause's name and verdict."""
        return {r.clause.name: r.verdict.value for r in self.results}

    def to_json(self) -> dict[str, object]:
        """The report as JSON-ready data."""
        clauses = [
            {
                "clause": r.clause.name,
                "level": r.clause.level.value,
                "source": r.clause.source,
                "checks": r.clause.text,
                "verdict": r.verdict.value,
                "detail": r.detail,
            }
            for r in self.results
        ]
        return {"url": self.url, "ok": self.ok, "requests": self.requests, "clauses": clauses}


def format_report(report: Report) -> str:
    """The report as a table."""
    lines = [f"idembarrier probe {report.url}: {report.requests} requests", ""]
    lines.append(f"  {'clause':<22} {'level':<9} {'verdict':<15} detail")
    lines += [f"  {r.clause.name:<22} {r.clause.level:<9} {r.verdict:<15} {r.detail}" for r in report.results]
    failed = [r.clause.name for r in report.results if r.verdict is Verdict.FAIL and r.clause.level is Level.MUST]
    lines += ["", f"failed MUST: {', '.join(failed)}" if failed else "every MUST clause passed"]
    return "\n".join(lines)


async def probe(target: Target, *, budget: int = 60, rate: float = 20.0, answer_within: float = 10.0) -> Report:
    """Probe ``target``, sending at most ``budget`` requests, at most ``rate`` a second (bursts aside).

    Args:
        target: The API to probe.
        budget: The most requests sent, the count endpoint's included.
        rate: The most requests a second; a burst of duplicates takes its share at once.
        answer_within: Seconds to wait for each answer before the target counts as unreachable.
    """
    async with httpx.AsyncClient(timeout=answer_within, follow_redirects=False, trust_env=False) as client:
        sender = Sender(client, budget=budget, rate=rate, burst=target.concurrency)
        session = Probe(target, sender)
        await session.start()
        results: list[Result] = []
        for check, clauses, cost in CHECKS:
            needed = target.concurrency + 2 if cost < 0 else cost
            if not sender.affords(needed):
                spent = f"the request budget ({budget}) is spent: raise --budget"
                results += [Result(clause, Verdict.NOT_APPLICABLE, spent) for clause in clauses]
                continue
            try:
                results += await check(session)
            except BudgetExhaustedError:  # pragma: no cover - the costs above are upper bounds
                results += [Result(c, Verdict.NOT_APPLICABLE, "the request budget is spent") for c in clauses]
        return Report(str(target.url), results, budget - sender.remaining)
