"""The probe's clauses: each one a short sequence of requests, and the verdict its answers support.

The clauses follow draft-ietf-httpapi-idempotency-key-header (the section is named on each), plus the
phantom-write cases that the draft's introduction rules out ("duplicate records for requests involving any
kind of money transfer MUST NOT be allowed"). A verdict is *pass* or *fail* only when the answers show it;
when they cannot (no resource id and no count endpoint, a target that could not be made to fail, a single
credential), the clause is *not applicable* and its detail says what would make it checkable.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._probe_proxy import losing_proxy

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._probe_http import Answer
    from ._probe_target import Probe

__all__ = ["CHECKS", "Clause", "Level", "Result", "Verdict"]


class Level(enum.StrEnum):
    """How binding a clause is: the draft's MUST and SHOULD, or common practice the draft leaves open."""

    MUST = "MUST"
    SHOULD = "SHOULD"
    PRACTICE = "practice"


class Verdict(enum.StrEnum):
    """What the answers showed."""

    PASS = "pass"
    FAIL = "fail"
    NOT_APPLICABLE = "not applicable"


@dataclass(frozen=True)
class Clause:
    """One checked requirement."""

    name: str
    level: Level
    source: str
    text: str


@dataclass(frozen=True)
class Result:
    """A clause's verdict, and why."""

    clause: Clause
    verdict: Verdict
    detail: str


def _clause(name: str, level: Level, source: str, text: str) -> Clause:
    return Clause(name, level, source, text)


REPLAY = _clause("replay", Level.SHOULD, "§2.6", "a retry with the same key and body gets the first answer")
MARKER = _clause(
    "replay-marker", Level.PRACTICE, "Stripe", "a replay is marked (Idempotent-Replayed), a first answer not"
)
MISMATCH = _clause("mismatch-refused", Level.MUST, "§2.7", "the same key with another body is refused")
MISMATCH_422 = _clause("mismatch-422", Level.SHOULD, "§2.7", "... with 422")
MISSING = _clause("missing-key-400", Level.SHOULD, "§2.7", "a request without the key gets 400")
MALFORMED = _clause("malformed-key-400", Level.SHOULD, "§2.1, §5", "a key that is not an sf-string gets 400")
CONCURRENT = _clause("concurrent-one-effect", Level.MUST, "§1", "concurrent duplicates produce one effect")
IN_FLIGHT = _clause(
    "in-flight-409", Level.SHOULD, "§2.6, §2.7", "a duplicate of a running request gets 409 or the replay"
)
LOST = _clause("lost-response", Level.MUST, "§1", "a retry after a lost response replays instead of running again")
SERVER_ERROR = _clause("5xx-not-stored", Level.PRACTICE, "§2.7", "a 5xx is not stored: the retry runs")
PRINCIPAL = _clause(
    "principal-scope", Level.SHOULD, "§5", "one key from two principals runs twice, never replays across"
)

_MALFORMED: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "unterminated": lambda: f'"{uuid.uuid4()}'.encode(),
    "two keys": lambda: f'"{uuid.uuid4()}", "{uuid.uuid4()}"'.encode(),
    "non-ASCII": lambda: f'"{uuid.uuid4()}-clé"'.encode(),
}


def _ok(answer: Answer) -> bool:
    return 200 <= answer.status < 300


async def _first(probe: Probe) -> list[Result]:
    first = probe.first
    again = await probe.send(first.key)
    results = []
    same_id = probe.resource_id(again) == probe.resource_id(first.answer)
    if again.same_as(first.answer) and same_id:
        results.append(Result(REPLAY, Verdict.PASS, f"both answered {again.short()}"))
    else:
        results.append(Result(REPLAY, Verdict.FAIL, f"first {first.answer.short()}; retry {again.short()}"))
    marker, before = again.marker(probe.target.replay_header), first.answer.marker(probe.target.replay_header)
    if marker is None:
        named = probe.target.replay_header
        verdict = Verdict.FAIL if named else Verdict.NOT_APPLICABLE
        results.append(Result(MARKER, verdict, f"no {named} on the replay" if named else "the API marks no replay"))
    elif before is not None and before[1].lower() not in ("false", "0"):
        results.append(Result(MARKER, Verdict.FAIL, f"the first answer carries {before[0]}: {before[1]} too"))
    elif again.same_as(first.answer):
        results.append(Result(MARKER, Verdict.PASS, f"{marker[0]}: {marker[1]}"))
    else:
        results.append(Result(MARKER, Verdict.FAIL, f"{marker[0]}: {marker[1]} on an answer that is no replay"))
    return results


async def _mismatch(probe: Probe) -> list[Result]:
    other = probe.target.other_body
    if other is None:
        why = "give --other-data: the request body has no number or string field to change"
        return [Result(MISMATCH, Verdict.NOT_APPLICABLE, why), Result(MISMATCH_422, Verdict.NOT_APPLICABLE, why)]
    control = await probe.send(probe.new_key(), body=other)
    if not _ok(control):
        why = f"the other body is refused under a new key too ({control.short()}): give --other-data"
        return [Result(MISMATCH, Verdict.NOT_APPLICABLE, why), Result(MISMATCH_422, Verdict.NOT_APPLICABLE, why)]
    answer = await probe.send(probe.first.key, body=other)
    if 400 <= answer.status < 500:
        refused = Result(MISMATCH, Verdict.PASS, f"refused: {answer.short()}")
    elif answer.same_as(probe.first.answer):
        refused = Result(MISMATCH, Verdict.FAIL, f"the first answer was replayed for another body: {answer.short()}")
    else:
        refused = Result(MISMATCH, Verdict.FAIL, f"the other body was not refused: {answer.short()}")
    code = Result(MISMATCH_422, Verdict.PASS if answer.status == 422 else Verdict.FAIL, f"answered {answer.status}")
    return [refused, code]


async def _missing(probe: Probe) -> list[Result]:
    if not probe.target.key_required:
        return [Result(MISSING, Verdict.NOT_APPLICABLE, "--key-optional: the API runs requests without a key")]
    answer = await probe.send(None)
    verdict = Verdict.PASS if answer.status == 400 else Verdict.FAIL
    return [Result(MISSING, verdict, answer.short() if verdict is Verdict.PASS else f"answered {answer.short()}")]


async def _malformed(probe: Probe) -> list[Result]:
    accepted = []
    for name, value in _MALFORMED.items():
        answer = await probe.send(value())
        if answer.status != 400:
            accepted.append(f"{name} ({answer.status})")
    if accepted:
        return [Result(MALFORMED, Verdict.FAIL, f"not refused with 400: {', '.join(accepted)}")]
    return [Result(MALFORMED, Verdict.PASS, f"400 for each of: {', '.join(_MALFORMED)}")]


async def _concurrent(probe: Probe) -> list[Result]:
    count = probe.target.concurrency
    before = await probe.count()
    answers = await probe.burst(probe.new_key(), count)
    effects = None if before is None else await probe.count_since(before)
    done = [a for a in answers if _ok(a)]
    ids = {probe.resource_id(a) for a in done}
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(_tally(answers).items()))
    if not done:
        na = Result(CONCURRENT, Verdict.NOT_APPLICABLE, f"no duplicate succeeded: {statuses}")
        return [na, Result(IN_FLIGHT, Verdict.NOT_APPLICABLE, "no duplicate succeeded")]
    if effects is not None and effects != 1:
        one = Result(CONCURRENT, Verdict.FAIL, f"{count} duplicates ({statuses}) made {effects} effects")
    elif None not in ids and len(ids) > 1:
        one = Result(CONCURRENT, Verdict.FAIL, f"{count} duplicates ({statuses}) got {len(ids)} resource ids")
    elif effects == 1:
        one = Result(CONCURRENT, Verdict.PASS, f"{count} duplicates ({statuses}) made 1 effect")
    elif None in ids or any(a.status >= 500 for a in answers):
        why = "the answers carry no resource id (--id-field) or some failed: name a --count-url"
        one = Result(CONCURRENT, Verdict.NOT_APPLICABLE, why)
    else:
        one = Result(CONCURRENT, Verdict.PASS, f"{count} duplicates ({statuses}) got 1 resource id")
    winner = done[0]
    rest = [a for a in answers if a is not winner]
    replays = sum(1 for a in rest if a.same_as(winner))
    conflicts = sum(1 for a in rest if a.status == 409)
    seen = f"1 ran; {conflicts} got 409, {replays} its answer, {len(rest) - conflicts - replays} another answer"
    verdict = Verdict.FAIL if conflicts + replays < len(rest) else Verdict.PASS
    return [one, Result(IN_FLIGHT, verdict, seen)]


def _tally(answers: list[Answer]) -> dict[int, int]:
    tally: dict[int, int] = {}
    for answer in answers:
        tally[answer.status] = tally.get(answer.status, 0) + 1
    return tally


async def _lost(probe: Probe) -> list[Result]:
    key = probe.new_key()
    before = await probe.count()
    async with losing_proxy(probe.target.url) as proxy:
        arrived = await probe.send_lost(key, proxy.port)
    if arrived is not None or not proxy.lost:
        return [Result(LOST, Verdict.NOT_APPLICABLE, "the proxy could not lose the answer")]
    lost = proxy.lost[0]
    if not _ok(lost):
        return [Result(LOST, Verdict.NOT_APPLICABLE, f"the lost answer was no success: {lost.short()}")]
    retry = await probe.send_retrying(key)
    effects = None if before is None else await probe.count_since(before)
    lost_id, retry_id = probe.resource_id(lost), probe.resource_id(retry)
    if (effects is not None and effects > 1) or (lost_id is not None and retry_id not in (None, lost_id)):
        seen = f"{effects} effects" if effects is not None else f"ids {lost_id} then {retry_id}"
        return [Result(LOST, Verdict.FAIL, f"the retry ran again ({seen}): {retry.short()}")]
    if effects == 1 or (lost_id is not None and retry_id == lost_id):
        return [Result(LOST, Verdict.PASS, f"the retry replayed the lost answer: {retry.short()}")]
    return [Result(LOST, Verdict.NOT_APPLICABLE, f"no resource id and no --count-url to judge {retry.short()}")]


async def _server_error(probe: Probe) -> list[Result]:
    if probe.target.fail_header is None:
        return [Result(SERVER_ERROR, Verdict.NOT_APPLICABLE, "name a way to make the target fail: --fail-header")]
    key = probe.new_key()
    failed = await probe.send(key, failing=True)
    if failed.status < 500:
        return [Result(SERVER_ERROR, Verdict.NOT_APPLICABLE, f"--fail-header got {failed.short()}, no 5xx")]
    retry = await probe.send_retrying(key)
    if _ok(retry) and retry.marker(probe.target.replay_header) is None:
        return [Result(SERVER_ERROR, Verdict.PASS, f"{failed.status}, then the retry ran: {retry.short()}")]
    if retry.status == 409:
        return [Result(SERVER_ERROR, Verdict.FAIL, f"the key stayed locked after the {failed.status}: {retry.short()}")]
    if retry.same_as(failed):
        return [Result(SERVER_ERROR, Verdict.FAIL, f"the {failed.status} was stored and replayed")]
    return [Result(SERVER_ERROR, Verdict.FAIL, f"{failed.status}, then the retry got {retry.short()}")]


async def _principal(probe: Probe) -> list[Result]:
    if probe.target.other_credential is None:
        return [Result(PRINCIPAL, Verdict.NOT_APPLICABLE, "give --credential and --other-credential")]
    key = probe.new_key()
    mine = await probe.send(key)
    if not _ok(mine):
        return [Result(PRINCIPAL, Verdict.NOT_APPLICABLE, f"the first principal got {mine.short()}")]
    theirs = await probe.send(key, other_principal=True)
    leaked = theirs.same_as(mine) or theirs.marker(probe.target.replay_header) is not None
    if _ok(theirs) and not leaked and probe.resource_id(theirs) != probe.resource_id(mine):
        return [Result(PRINCIPAL, Verdict.PASS, f"each principal's request ran: {theirs.short()}")]
    if leaked:
        return [Result(PRINCIPAL, Verdict.FAIL, f"the second principal got the first one's answer: {theirs.short()}")]
    return [Result(PRINCIPAL, Verdict.FAIL, f"the second principal's request was not run: {theirs.short()}")]


Check = tuple["Callable[[Probe], Awaitable[list[Result]]]", tuple[Clause, ...], int]

CHECKS: tuple[Check, ...] = (
    (_first, (REPLAY, MARKER), 1),
    (_mismatch, (MISMATCH, MISMATCH_422), 2),
    (_missing, (MISSING,), 1),
    (_malformed, (MALFORMED,), len(_MALFORMED)),
    (_concurrent, (CONCURRENT, IN_FLIGHT), -1),  # the burst, and two counts
    (_lost, (LOST,), 6),
    (_server_error, (SERVER_ERROR,), 4),
    (_principal, (PRINCIPAL,), 2),
)
"""Each check, the clauses it decides, and the requests it may send (-1: the burst size plus two)."""
