"""The middleware's own answers, as RFC 9457 problem details (``application/problem+json``).

Each problem has a stable ``type`` URI that clients may match on; ``title`` is fixed per type and
``detail`` explains the instance. `Problems` configures them: the status of each (the draft's by default),
the base of the ``type`` URIs, the status of a late replay past retention (409 or 410), and a hook that
shapes the body (`Problems.stripe` answers as Stripe's API does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from .._exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._types import Send

__all__ = [
    "DEFAULT_BASE_URI",
    "DEFAULT_PROBLEMS",
    "Problem",
    "ProblemDetails",
    "ProblemShape",
    "Problems",
    "send_problem",
]

DEFAULT_BASE_URI = "https://idembarrier.dev/problems/"
"""The base of the problems' ``type`` URIs unless `Problems` is told otherwise: each type is it plus a slug."""

_log = logging.getLogger("idembarrier.asgi")


@dataclass(frozen=True, slots=True)
class _Kind:
    status: int
    slug: str
    title: str


class Problem(Enum):
    """The problems the middleware answers with, each with the draft's HTTP status and its default ``type`` URI.

    `Problems` chooses another status per problem, or another base for the ``type`` URIs.
    """

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
    """The key was used already and its stored response has expired; nothing runs again (409, or 410 by
    ``Problems(expired_status=410)``)."""
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
        """The draft's HTTP status code (the default; see `Problems`)."""
        return self.value.status

    @property
    def type(self) -> str:
        """The stable ``type`` URI under the default base."""
        return DEFAULT_BASE_URI + self.value.slug

    @property
    def title(self) -> str:
        """The short, fixed summary of the problem type."""
        return self.value.title


@dataclass(frozen=True, slots=True, kw_only=True)
class ProblemDetails:
    """One occurrence of a problem, as configured: what a `Problems` shape hook is given.

    Attributes:
        problem: Which problem it is.
        status: The HTTP status it is answered with.
        type: Its ``type`` URI.
        title: The fixed summary of its type.
        detail: What happened in this instance.
    """

    problem: Problem
    status: int
    type: str
    title: str
    detail: str

    def document(self) -> dict[str, object]:
        """Return the RFC 9457 problem-details document (``type``, ``title``, ``status``, ``detail``)."""
        return {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}


ProblemShape = Callable[[ProblemDetails], Mapping[str, object]]
"""A hook that returns the JSON document to send for a problem."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Problems:
    """How the middleware answers its problems; checked once, frozen.

    Args:
        base_uri: The absolute URI each ``type`` URI starts with (the slug follows it).
        statuses: A status (4xx or 5xx) per problem, for those not answered with the draft's. A late replay
            past retention is set by ``expired_status``.
        expired_status: The status of ``key-expired``: 409 (the key was used; the default) or 410 (its
            response is gone).
        shape: Returns the JSON document to send for a `ProblemDetails`; default: RFC 9457's. If it raises,
            the client gets a 500 ``internal-error`` problem in RFC 9457's form, and the error is logged.
        media_type: The ``Content-Type`` of the body.
    """

    base_uri: str = DEFAULT_BASE_URI
    statuses: Mapping[Problem, int] = field(default_factory=dict)
    expired_status: Literal[409, 410] = 409
    shape: ProblemShape | None = None
    media_type: str = "application/problem+json"

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_uri) if isinstance(self.base_uri, str) else None
        if parts is None or not parts.scheme or not (parts.netloc or parts.path):
            raise ConfigurationError(
                f"base_uri must be an absolute URI, such as {DEFAULT_BASE_URI!r}, not {self.base_uri!r}"
            )
        statuses = dict(self.statuses)
        for problem, status in statuses.items():
            if not isinstance(problem, Problem):
                raise ConfigurationError(f"statuses are set per Problem, not for {problem!r}")
            if problem is Problem.KEY_EXPIRED:
                raise ConfigurationError("the status of Problem.KEY_EXPIRED is set by expired_status (409 or 410)")
            if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
                raise ConfigurationError(f"{problem.name} must answer a 4xx or 5xx status, not {status!r}")
        object.__setattr__(self, "statuses", MappingProxyType(statuses))
        if self.expired_status not in (409, 410):
            raise ConfigurationError(f"expired_status must be 409 or 410, not {self.expired_status!r}")
        if self.shape is not None and not callable(self.shape):
            raise ConfigurationError("shape must be a callable of ProblemDetails that returns a JSON document")
        if (
            not isinstance(self.media_type, str)
            or not self.media_type.isascii()
            or "/" not in self.media_type
            or any(c in self.media_type for c in "\r\n")
        ):
            raise ConfigurationError(
                f"media_type must be a media type such as 'application/json', not {self.media_type!r}"
            )

    @classmethod
    def stripe(cls, *, base_uri: str = DEFAULT_BASE_URI) -> Problems:
        """Answer as Stripe's API documents: a reused key is a 400 ``idempotency_error``, in JSON.

        The body is Stripe's error object, ``{"error": {"type": …, "message": …}}``. Stripe documents the
        ``idempotency_error`` type for a key reused with other parameters, and 409 for a request that conflicts
        with another using the same key (the draft's status already). The other problems keep their status and
        take Stripe's general types: ``invalid_request_error`` for a 4xx, ``api_error`` for a 5xx.
        """
        return cls(
            base_uri=base_uri,
            statuses={Problem.KEY_REUSED: 400},
            shape=_stripe_error,
            media_type="application/json",
        )

    def status(self, problem: Problem) -> int:
        """The HTTP status ``problem`` is answered with."""
        if problem is Problem.KEY_EXPIRED:
            return self.expired_status
        return self.statuses.get(problem, problem.status)

    def type(self, problem: Problem) -> str:
        """The ``type`` URI of ``problem``."""
        return self.base_uri + problem.value.slug

    def details(self, problem: Problem, detail: str) -> ProblemDetails:
        """Return one occurrence of ``problem``, as configured."""
        return ProblemDetails(
            problem=problem, status=self.status(problem), type=self.type(problem), title=problem.title, detail=detail
        )

    def render(self, problem: Problem, detail: str) -> tuple[int, str, bytes]:
        """Return the status, media type and body that answer ``problem``."""
        details = self.details(problem, detail)
        if self.shape is None:
            return details.status, self.media_type, _encode(details.document())
        try:
            body = _encode(self.shape(details))
        except Exception:  # the hook's bug: still a problem, never a bare 500
            _log.exception("the problem shape hook failed for %s", problem.value.slug)
            failed = self.details(Problem.INTERNAL_ERROR, "the idempotency layer failed to describe a problem")
            return 500, "application/problem+json", _encode({**failed.document(), "status": 500})
        return details.status, self.media_type, body


def _encode(document: Mapping[str, object]) -> bytes:
    if not isinstance(document, Mapping):
        raise TypeError(f"a problem's body is a JSON object, not {type(document).__name__}")
    return json.dumps(document, ensure_ascii=False, allow_nan=False).encode()


def _stripe_error(details: ProblemDetails) -> dict[str, object]:
    """Stripe's error object for ``details``: its documented types, the problem's detail as the message."""
    if details.problem is Problem.KEY_REUSED:
        kind = "idempotency_error"
    elif details.status >= 500:
        kind = "api_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"type": kind, "message": details.detail}}


DEFAULT_PROBLEMS = Problems()
"""The draft's answers: RFC 9457 documents, the draft's statuses, ``key-expired`` a 409."""


async def send_problem(
    send: Send,
    problem: Problem,
    detail: str,
    *,
    problems: Problems = DEFAULT_PROBLEMS,
    retry_after: int | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with ``problem`` as ``problems`` configure it, with ``Retry-After`` when given, and ``headers``."""
    status, media_type, body = problems.render(problem, detail)
    head = [(b"content-type", media_type.encode("ascii")), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        head.append((b"retry-after", str(retry_after).encode()))
    head.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
