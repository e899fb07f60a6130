"""The middleware's own answers, as RFC 9457 problem details (``application/problem+json``).

Each problem has a stable ``type`` URI that clients may match on; ``title`` is fixed per type and
``detail`` explains the instance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._types import Send

__all__ = ["Problem", "problem_body", "send_problem"]

_BASE = "https://idembarrier.dev/problems/"


@dataclass(frozen=True, slots=True)
class _Kind:
    status: int
    slug: str
    title: str


class Problem(Enum):
    """The problems the middleware answers with, each with its HTTP status and ``type`` URI."""

    KEY_MISSING = _Kind(400, "key-missing", "Idempotency-Key header missing")
    """A guarded request came without the key, which is required (400)."""
    KEY_INVALID = _Kind(400, "key-invalid", "Idempotency-Key header invalid")
    """The header is not an RFC 9651 string or bare token, or its key is unusable (400)."""
    KEY_REUSED = _Kind(422, "key-reused", "Idempotency-Key reused for a different request")
    """The key was already used for a request with another fingerprint (422)."""
    KEY_IN_PROGRESS = _Kind(409, "key-in-progress", "A request with this Idempotency-Key is in progress")
    """The first request with the key has not finished; retry after ``Retry-After`` seconds (409)."""
    KEY_UNRESOLVED = _Kind(409, "key-unresolved", "The outcome of this Idempotency-Key needs reconciliation")
    """The key's earlier work died too often to be retried blindly; an operator must resolve it (409)."""
    KEY_EXPIRED = _Kind(409, "key-expired", "The response of this Idempotency-Key is past retention")
    """The key was used already and its stored response has expired; nothing runs again (409)."""
    REQUEST_TOO_LARGE = _Kind(413, "request-too-large", "Request body too large to guard")
    """The request body exceeds the middleware's ``max_body_bytes`` (413)."""
    BODY_INVALID = _Kind(400, "body-invalid", "Request body cannot be fingerprinted")
    """``normalise_body`` made of the body what has no canonical form (NaN, infinities, deep nesting) (400)."""
    NOT_AUTHENTICATED = _Kind(401, "not-authenticated", "Request not authenticated")
    """``scope_of`` refused the request with ``ScopeRefusedError(status=401)``: it names no principal (401)."""
    FORBIDDEN = _Kind(403, "forbidden", "Request forbidden")
    """``scope_of`` refused the request with ``ScopeRefusedError(status=403)`` (403)."""
    FINGERPRINT_VERSION_UNKNOWN = _Kind(
        503, "fingerprint-version-unknown", "The record of this Idempotency-Key was made by another deploy"
    )
    """The key's record was fingerprinted by a version this instance does not register (a newer deploy wrote it):
    nothing ran; retry with the same key, which an instance of that deploy compares (503, ``Retry-After``)."""
    OUTCOME_UNKNOWN = _Kind(503, "outcome-unknown", "Outcome unknown: retry with the same Idempotency-Key")
    """The database connection was lost during the COMMIT: the request may have taken effect. A retry with
    the same key replays its response if it did, and runs it if it did not; a new key could run it twice (503)."""
    CONNECTION_LOST = _Kind(503, "connection-lost", "Database connection lost; nothing was recorded")
    """The database connection was lost before the COMMIT: nothing took effect; retry (503)."""
    TRANSACTION_ABORTED = _Kind(503, "transaction-aborted", "Transaction aborted by the database; nothing was recorded")
    """The database aborted the transaction (serialization failure, deadlock): nothing took effect; retry (503)."""
    STORAGE_FAILED = _Kind(503, "storage-failed", "Database failed; nothing was recorded")
    """Any other database failure (``StorageError``): nothing took effect; retry later (503)."""
    INTERNAL_ERROR = _Kind(500, "internal-error", "Idempotency layer failed; nothing was recorded")
    """Any other failure of idembarrier's (``UnitOfWorkError``, ``SchemaError``…), a misuse or a misconfiguration:
    nothing was recorded, and the exception goes on to the server's error handling (500)."""
    APPLICATION_ERROR = _Kind(500, "application-error", "Application failed; nothing was recorded")
    """The application (a route, ``scope_of``) raised: its writes rolled back, nothing was recorded, and the
    exception goes on to the server's error handling (500)."""

    @property
    def status(self) -> int:
        """The HTTP status code."""
        return self.value.status

    @property
    def type(self) -> str:
        """The stable ``type`` URI."""
        return _BASE + self.value.slug

    @property
    def title(self) -> str:
        """The short, fixed summary of the problem type."""
        return self.value.title


def problem_body(problem: Problem, detail: str) -> bytes:
    """Return the problem-details document for one occurrence of ``problem``."""
    document = {"type": problem.type, "title": problem.title, "status": problem.status, "detail": detail}
    return json.dumps(document, ensure_ascii=False).encode()


async def send_problem(
    send: Send,
    problem: Problem,
    detail: str,
    *,
    retry_after: int | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with ``problem`` as ``application/problem+json``, with ``Retry-After`` when given, and ``headers``."""
    body = problem_body(problem, detail)
    head = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        head.append((b"retry-after", str(retry_after).encode()))
    head.extend(headers)
    await send({"type": "http.response.start", "status": problem.status, "headers": head})
    await send({"type": "http.response.body", "body": body})
