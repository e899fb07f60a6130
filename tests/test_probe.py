"""``idembarrier probe`` against real implementations, each on a real uvicorn on loopback.

Each test says why the verdicts follow from the implementation's code: idembarrier's middleware; idemkit's
ASGI middleware (1.0.2) and asgi-idempotency-header (0.2.0), both on the Redis at 127.0.0.1:6379; and a
deliberately naive SELECT-then-INSERT layer (`tests.probe_apps`).
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from idembarrier.cli import main
from idembarrier.cli._probe_http import Answer, BudgetExhaustedError, Sender, TargetUnreachableError
from idembarrier.cli._probe_target import other_body
from tests.helpers import require
from tests.probe_apps import careless_app, header_app, idembarrier_app, idemkit_app, naive_app, probe_args, serving

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import Database

ALL_PASS = dict.fromkeys(
    [
        "replay",
        "replay-marker",
        "mismatch-refused",
        "mismatch-422",
        "missing-key-400",
        "malformed-key-400",
        "concurrent-one-effect",
        "in-flight-409",
        "lost-response",
        "5xx-not-stored",
        "principal-scope",
    ],
    "pass",
)


@pytest.fixture
def redis() -> None:
    """The Redis the peer middlewares keep their keys in (127.0.0.1:6379): missing, fail under CI, else skip."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError as exc:
        require(False, f"these tests need Redis on 127.0.0.1:6379: {exc}")


def probe(capsys: pytest.CaptureFixture[str], app: object, *extra: str) -> tuple[int, dict[str, object]]:
    """Probe ``app``'s orders endpoint with every clause made checkable; return the exit status and the report."""
    with serving(app) as base:
        status = main(probe_args(base, "--json", *extra))
    captured = capsys.readouterr()
    assert captured.out, captured.err
    report: dict[str, object] = json.loads(captured.out)
    return status, report


def verdicts(report: dict[str, object]) -> dict[str, str]:
    clauses = report["clauses"]
    assert isinstance(clauses, list)
    return {c["clause"]: c["verdict"] for c in clauses}


@pytest.mark.parametrize("failure", ["1", "503"], ids=["exception", "503"])
async def test_idembarrier_passes_every_clause(
    pg_db: Database, capsys: pytest.CaptureFixture[str], failure: str
) -> None:
    """idembarrier's middleware passes every clause, and the probe exits 0, whether the route raises or answers 503."""
    app = idembarrier_app(pg_db.url)
    status, report = await anyio.to_thread.run_sync(lambda: probe(capsys, app, "--fail-header", f"X-Fail: {failure}"))
    assert verdicts(report) == ALL_PASS, report
    assert status == 0
    assert report["ok"] is True


@pytest.mark.usefixtures("redis")
def test_idemkit(capsys: pytest.CaptureFixture[str]) -> None:
    """idemkit fails only on malformed keys: it takes any non-empty value up to 255 bytes as the key.

    `_unwrap_sf_string` strips one pair of quotes when there is one and keeps the value otherwise, so an
    unterminated string, two keys in one field and non-ASCII bytes all run; an empty value counts as a
    missing key (400, with ``require_key_for_mutations``). Concurrent duplicates wait for the first and get
    its answer (`wait_for_completion`), non-2xx answers release the claim (`cacheable_status`), the record
    is stored right after the response is sent, and the key is scoped by the ``scope`` extractor.
    """
    status, report = probe(capsys, idemkit_app())
    assert verdicts(report) == {**ALL_PASS, "malformed-key-400": "fail"}, report
    assert status == 0


@pytest.mark.usefixtures("redis")
def test_asgi_idempotency_header(capsys: pytest.CaptureFixture[str]) -> None:
    """asgi-idempotency-header keeps the first answer for a key whatever else comes with it.

    No fingerprint: another body under a used key gets the stored answer (a failed MUST, exit 1). No key is
    required and none is validated (``enforce_uuid4_formatting=False``), and the key is global, so another
    principal gets the first one's answer. Concurrent duplicates get 409 (``SADD`` on one set), the answer
    is stored before it is sent, and it is replayed with ``Idempotent-Replayed: true``. An exception leaves
    the key in the pending set with no answer stored, so every retry gets 409 (its issue #16).
    """
    status, report = probe(capsys, header_app())
    failing = ["mismatch-refused", "mismatch-422", "missing-key-400", "malformed-key-400", "5xx-not-stored"]
    assert verdicts(report) == {**ALL_PASS, **dict.fromkeys([*failing, "principal-scope"], "fail")}, report
    assert status == 1


def test_naive_select_then_insert(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The SELECT-then-INSERT layer runs every concurrent duplicate, and so fails the phantom-write MUST.

    All of the burst's SELECTs find nothing before the first INSERT: each duplicate runs and the count
    grows by the burst's size. Its answer is stored before it is sent, so a lost answer replays; an
    exception stores nothing, so a 5xx is not kept. It has no fingerprint, no required key, no validation,
    no scope and no replay marker.
    """
    status, report = probe(capsys, naive_app(f"sqlite+aiosqlite:///{tmp_path / 'naive.db'}"))
    failing = ["mismatch-refused", "mismatch-422", "missing-key-400", "malformed-key-400", "principal-scope"]
    expected = {**ALL_PASS, **dict.fromkeys([*failing, "concurrent-one-effect", "in-flight-409"], "fail")}
    assert verdicts(report) == {**expected, "replay-marker": "not applicable"}, report
    assert status == 1
    concurrent = next(c for c in report["clauses"] if c["clause"] == "concurrent-one-effect")  # type: ignore[attr-defined]
    assert concurrent["detail"] == "5 duplicates (201: 5) made 5 effects"


def test_the_table_names_each_clause_and_the_failed_musts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Without --json, the report is a table with one row per clause and a closing line naming the failed MUSTs."""
    with serving(naive_app(f"sqlite+aiosqlite:///{tmp_path / 'naive.db'}")) as base:
        status = main(probe_args(base, "--concurrency", "3"))
    out = capsys.readouterr().out
    assert status == 1
    assert "concurrent-one-effect  MUST      fail            3 duplicates (201: 3) made 3 effects" in out
    assert out.rstrip().endswith("failed MUST: mismatch-refused, concurrent-one-effect")


def test_the_budget_caps_the_requests(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A check the request budget cannot afford is not applicable; the probe never sends past the budget."""
    status, report = probe(capsys, naive_app(f"sqlite+aiosqlite:///{tmp_path / 'naive.db'}"), "--budget", "9")
    assert isinstance(report["requests"], int)
    assert report["requests"] <= 9
    found = verdicts(report)
    assert found["malformed-key-400"] == "fail"
    assert found["concurrent-one-effect"] == found["principal-scope"] == "not applicable"
    assert status == 1  # mismatch-refused still failed


def test_without_the_optional_inputs_those_clauses_are_not_applicable(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """No count endpoint, failure switch, second principal or required key: those clauses say what is missing."""
    with serving(naive_app(f"sqlite+aiosqlite:///{tmp_path / 'naive.db'}")) as base:
        status = main(["probe", f"{base}/orders", "--json", "--key-optional", "--rate", "100"])
    report = json.loads(capsys.readouterr().out)
    details = {c["clause"]: (c["verdict"], c["detail"]) for c in report["clauses"]}
    assert details["missing-key-400"][0] == "not applicable"
    assert details["5xx-not-stored"] == ("not applicable", "name a way to make the target fail: --fail-header")
    assert details["principal-scope"] == ("not applicable", "give --credential and --other-credential")
    assert details["concurrent-one-effect"][0] == "fail"  # the answers' distinct ids show it without a count
    assert details["lost-response"][0] == "pass"  # the lost answer's id, read by the proxy, is the retry's
    assert status == 1


def test_an_unreachable_target_exits_3_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening: exit 3, one line on stderr naming the target and the OS's reason."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    assert main(["probe", f"http://127.0.0.1:{port}/orders"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"idembarrier: probe: the target could not be reached: POST http://127.0.0.1:{port}/orders")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ftp://example.test/x"], "the target must be an http:// or https:// URL"),
        (["http://127.0.0.1:1/x", "--count-url", "http://other.test/count"], "--count-url must be on the target"),
        (["http://127.0.0.1:1/x", "-H", "no colon"], "--header takes 'Name: value'"),
        (["http://127.0.0.1:1/x", "--other-credential", "A: b"], "--other-credential needs --credential"),
        (["http://127.0.0.1:1/x", "--concurrency", "1"], "--concurrency must be 2-50"),
        (["http://127.0.0.1:1/x", "--budget", "0"], "--budget, --rate and --timeout must be positive"),
    ],
)
def test_bad_usage_exits_2_before_any_request(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Options that name no probe-able target: exit 2 and one line, and nothing sent (port 1 would refuse)."""
    assert main(["probe", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err


def test_a_target_that_refuses_the_first_request_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A body the API refuses (422 here) stops the probe at its first request: the options are wrong."""
    with serving(naive_app(f"sqlite+aiosqlite:///{tmp_path / 'naive.db'}")) as base:
        assert main(["probe", f"{base}/orders", "--data", '{"amount": "lots"}']) == 2
    assert "the target answered 422" in capsys.readouterr().err


def test_another_body_changes_one_value() -> None:
    """The mismatch clause's body is the given one with its first number plus one, else its first string changed."""
    assert json.loads(other_body(b'{"item": "a", "amount": 5}') or b"") == {"item": "a", "amount": 6}
    assert json.loads(other_body(b'{"item": "a", "paid": true}') or b"") == {"item": "a-other", "paid": True}
    assert other_body(b'{"paid": true}') is None
    assert other_body(b"[1]") is None
    assert other_body(b"not json") is None


def test_a_stored_503_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The naive layer stores whatever the route answered, so a 503 answer (not an exception) is replayed."""
    app = naive_app(f"sqlite+aiosqlite:///{tmp_path / 'naive.db'}")
    _, report = probe(capsys, app, "--fail-header", "X-Fail: 503")
    clause = next(c for c in report["clauses"] if c["clause"] == "5xx-not-stored")  # type: ignore[attr-defined]
    assert (clause["verdict"], clause["detail"]) == ("fail", "the 503 was stored and replayed")


def test_an_api_without_idempotency_fails_what_it_shows(capsys: pytest.CaptureFixture[str]) -> None:
    """No idempotency at all, every answer marked a replay: each retry runs again, and the probe says so.

    Its ids sit in a nested field (``--id-field``) and its count endpoint is a list.
    """
    with serving(careless_app()) as base:
        args = ["probe", f"{base}/orders", "--json", "--rate", "100", "--key-optional", "--id-field", "order.number"]
        status = main([*args, "--count-url", "/orders/all", "--replay-header", "Idempotent-Replayed"])
    details = {c["clause"]: (c["verdict"], c["detail"]) for c in json.loads(capsys.readouterr().out)["clauses"]}
    assert status == 1
    assert details["replay"][0] == "fail"
    assert details["replay-marker"] == ("fail", "the first answer carries idempotent-replayed: true too")
    assert details["mismatch-refused"][0] == "fail"
    assert details["mismatch-refused"][1].startswith("the other body was not refused: 201")
    assert details["concurrent-one-effect"][1] == "5 duplicates (201: 5) made 5 effects"
    assert details["lost-response"][0] == "fail"
    assert details["lost-response"][1].startswith("the retry ran again (2 effects)")


def test_a_count_endpoint_without_a_count_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A --count-url whose answer holds no number is bad usage: exit 2, naming what it answered."""
    with serving(naive_app(f"sqlite+aiosqlite:///{tmp_path / 'naive.db'}")) as base:
        assert main(["probe", f"{base}/orders", "--count-url", "/orders", "--rate", "100"]) == 2
    assert "--count-url answered 405" in capsys.readouterr().err


async def test_the_sender_keeps_to_its_budget_and_rate() -> None:
    """Requests past the budget are refused before they are sent; the rate spaces the rest out."""
    sent: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(anyio.current_time())
        return httpx.Response(200, content=b"not json")

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        sender = Sender(client, budget=3, rate=20, burst=1)
        answers = [await sender.send("POST", "http://api.test/x", headers=[]) for _ in range(3)]
        with pytest.raises(BudgetExhaustedError):
            await sender.send("POST", "http://api.test/x", headers=[])
    assert len(sent) == 3
    assert sent[2] - sent[0] >= 0.09  # two intervals of 1/20 s, less the clock's rounding
    assert answers[0].document() is None
    assert answers[0].same_as(Answer(200, {}, b"not json"))


async def test_a_refused_connection_is_no_lost_answer() -> None:
    """Only a connection closed without an answer is a lost answer; a refused one means an unreachable target."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        sender = Sender(client, budget=1, rate=20, burst=1)
        with pytest.raises(TargetUnreachableError, match="connection refused"):
            await sender.send_lost("POST", "http://api.test/x", headers=[], body=b"{}")
