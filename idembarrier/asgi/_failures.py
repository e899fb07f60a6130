"""What the client is told when a guarded request fails: every failure becomes a problem, never a bare 500.

By exception type (never by message text):

- `ConnectionLostError` with ``outcome_unknown`` → 503 ``outcome-unknown``: the COMMIT was in flight, the
  request may have taken effect, and only a retry with the same key is safe (it replays or runs);
- any other `StorageError` (`ConnectionLostError`, `SerializationError`, the rest) → 503 with its own type
  and ``Retry-After``: nothing took effect;
- any other `IdembarrierError` → 500 ``internal-error``; the request's own exception → 500
  ``application-error``. Both go on to the server's error handling (logs, error trackers) after the
  answer, as Starlette's ``ServerErrorMiddleware`` does: a bug must stay loud.

Every answer but ``outcome-unknown`` carries ``Idempotency-Stored: false``: nothing was recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .._exceptions import (
    ConfigurationError,
    ConnectionLostError,
    IdembarrierError,
    SerializationError,
    StorageError,
)
from ._problems import DEFAULT_PROBLEMS, Problem, Problems, send_problem

if TYPE_CHECKING:
    from ._types import Send

__all__ = ["NOT_STORED", "Answer", "ScopeRefusedError", "answer_failure", "answer_for"]

NOT_STORED = (b"idempotency-stored", b"false")

_log = logging.getLogger("idembarrier.asgi")


class ScopeRefusedError(IdembarrierError):
    """Raised by a ``scope_of`` to refuse a request: the middleware answers a 401 or 403 problem.

    Args:
        detail: Why, for the client (it is sent in the problem's ``detail``).
        status: 401 (no principal: not authenticated) or 403 (a principal not allowed).
        challenge: For a 401, the ``WWW-Authenticate`` challenge to send (``'Bearer realm="api"'``).
    """

    def __init__(self, detail: str, *, status: Literal[401, 403] = 403, challenge: str | None = None) -> None:
        if status not in (401, 403):
            raise ConfigurationError(f"a refused scope answers 401 or 403, not {status!r}")
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.challenge = challenge


@dataclass(frozen=True, slots=True)
class Answer:
    """The problem a failure is answered with, and whether its exception goes on to the server."""

    problem: Problem
    detail: str
    retry_after: int | None = None
    stored_false: bool = True
    reraise: bool = False


def answer_for(exc: Exception, retry_after: int) -> Answer:
    """Return how the failure ``exc`` of a guarded request is answered."""
    if isinstance(exc, ConnectionLostError) and exc.outcome_unknown:
        detail = (
            "the database connection was lost while this request's outcome was being committed: it may or may "
            "not have taken effect. Retry with the same Idempotency-Key: the retry replays the response if it "
            "took effect and runs it otherwise. A new key could run it twice"
        )
        return Answer(Problem.OUTCOME_UNKNOWN, detail, retry_after, stored_false=False)
    if isinstance(exc, ConnectionLostError):
        detail = "the database connection was lost before anything committed; retry with the same key"
        return Answer(Problem.CONNECTION_LOST, detail, retry_after)
    if isinstance(exc, SerializationError):
        detail = "the database aborted the transaction before anything committed; retry with the same key"
        return Answer(Problem.TRANSACTION_ABORTED, detail, retry_after)
    if isinstance(exc, StorageError):
        detail = "the database failed before anything committed; retry with the same key later"
        return Answer(Problem.STORAGE_FAILED, detail, retry_after)
    if isinstance(exc, ScopeRefusedError):
        problem = Problem.NOT_AUTHENTICATED if exc.status == 401 else Problem.FORBIDDEN
        return Answer(problem, exc.detail)
    if isinstance(exc, IdembarrierError):
        detail = f"the idempotency layer failed ({type(exc).__name__}); nothing was recorded"
        return Answer(Problem.INTERNAL_ERROR, detail, reraise=True)
    detail = "the application failed; its writes rolled back and nothing was recorded, so a retry runs again"
    return Answer(Problem.APPLICATION_ERROR, detail, reraise=True)


async def answer_failure(
    send: Send, exc: BaseException, retry_after: int, problems: Problems = DEFAULT_PROBLEMS
) -> bool:
    """Answer the failure ``exc`` as a problem; return whether it must still be raised to the server.

    A cancellation, or any other `BaseException` that is not an `Exception`, is not answered: it is raised.
    """
    if not isinstance(exc, Exception):
        return True
    answer = answer_for(exc, retry_after)
    headers = [NOT_STORED] if answer.stored_false else []
    if isinstance(exc, ScopeRefusedError) and exc.challenge is not None:
        headers.append((b"www-authenticate", exc.challenge.encode("latin-1")))
    if isinstance(exc, StorageError):
        # Answered, and not raised: a database outage is the operator's to see, not a bug's traceback.
        _log.warning("guarded request answered %s: %r", problems.status(answer.problem), exc, exc_info=exc)
    await send_problem(
        send, answer.problem, answer.detail, problems=problems, retry_after=answer.retry_after, headers=headers
    )
    return answer.reraise
