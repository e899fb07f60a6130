"""A guarded request that runs the application: its response is held back until its outcome has committed.

The application's ``http.response.start`` is held. When the response's outcome is known, the unit of
work is finished (its record and the route's writes commit, or roll back, together) and only then does
the response go out, so a client never sees a success that could still roll back:

- the last body message of a response that fits in ``max_response_bytes`` → the whole response is
  recorded (2xx/3xx as COMPLETED, a chosen 4xx as FAILED) and committed, then sent;
- a body message with ``more_body`` (a streamed response), one over the cap, or any other message → the
  outcome is recorded without the body (``body_stored=False``) and committed before the first byte goes
  out; the stream then passes through, marked ``Idempotency-Stored: false``;
- a 5xx, or a 4xx not chosen for storing → the writes roll back, nothing is recorded, and the response
  goes out marked ``Idempotency-Stored: false``: a retry runs again;
- an exception before any of that → the writes roll back, nothing is recorded, and the client gets a
  problem (`idembarrier.asgi._failures`: a 503 for the database's failures, else a 500 marked
  ``Idempotency-Stored: false``); the exception goes on to the server unless it was the database's;
- an exception once the response has begun → it propagates; the client's response is cut short.

Because the outcome is settled from inside the application's ``send``, while the application is still
running, the unit of work is driven by its named steps (``start``/``commit``/``rollback``) rather than with
``async with``: no block of the middleware's own spans exactly "until the response is complete".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._exceptions import UnitOfWorkError
from ._failures import NOT_STORED, answer_failure
from ._response import HTTPResponse, select_headers

if TYPE_CHECKING:
    from .._uow import UnitOfWork
    from ._settings import Settings
    from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Execution"]

_REPRESENTATION = frozenset({"content-type", "content-encoding", "content-language", "etag", "last-modified"})
"""Headers that describe a body: dropped from a record that keeps no body, so an empty replay stays valid."""


class _NotStored(Exception):
    """Rolls the unit of work back when the response is not to be recorded (5xx, 4xx not chosen)."""


class Execution:
    """Runs the application for a claimed key, and finishes the unit of work as its response completes."""

    __slots__ = ("_downstream", "_failure", "_open", "_replied", "_settings", "_start", "_uow")

    def __init__(self, uow: UnitOfWork[HTTPResponse], settings: Settings, send: Send) -> None:
        self._uow = uow
        self._settings = settings
        self._downstream = send
        self._start: Message | None = None
        self._open = True  # the unit of work still waits for its outcome
        self._replied = False  # the response has begun to go out: the client can be told nothing else
        self._failure: BaseException | None = None

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive) -> None:
        """Call ``app``; when it is done, the unit of work is finished, one way or the other."""
        try:
            await app(scope, receive, self.send)
        except BaseException as exc:
            await self.finish(exc)
            return
        await self.finish(None)

    async def finish(self, raised: BaseException | None) -> None:
        """Finish the unit of work once the application has returned, or raised ``raised``.

        For a caller that ran the application itself with `send` (a route guard, which opens the unit of
        work while the application is already running).
        """
        if raised is not None:
            # Recording the outcome failed (the application propagated it, or raised its own), or the
            # application raised before its response was complete.
            await self._fail(self._failure or await self._exit(raised))
            return
        if self._failure is not None:
            await self._fail(self._failure)  # recording the outcome failed, and the application swallowed it
            return
        if self._open:
            error = UnitOfWorkError("the application returned without completing its response; its writes rolled back")
            await self._fail(await self._exit(error))
            return
        await self._check_session_left_alone()

    async def _exit(self, exc: BaseException) -> BaseException:
        """Roll the unit of work back for ``exc`` if it is still open; return what the client is to be told of.

        That is ``exc``, or ours if rolling back turned it into a database failure (a lost connection).
        """
        if not self._open:
            return exc
        self._open = False
        try:
            await self._uow.rollback(exc)
        except BaseException as ours:
            return ours
        return exc

    async def _fail(self, failure: BaseException) -> None:
        """Answer ``failure`` as a problem, unless the response has begun; raise it unless it was answered for good."""
        if self._replied or await answer_failure(
            self._downstream, failure, self._settings.retry_after, self._settings.problems
        ):
            raise failure

    async def send(self, message: Message) -> None:
        """The ``send`` the application is given."""
        if self._failure is not None:
            raise UnitOfWorkError("the response was abandoned: recording its outcome failed") from self._failure
        if not self._open:
            self._replied = True
            await self._downstream(message)
            return
        if self._start is None:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {message['type']!r}")
            self._start = message
            return
        body: bytes | None = None
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            body = bytes(message.get("body", b""))
            if len(body) > self._settings.max_response_bytes:
                body = None
        await self._record_outcome(self._start, body)
        if body is None:
            await self._downstream(message)  # the first chunk of a stream, an oversized body, or an extension's
        else:
            await self._downstream({"type": "http.response.body", "body": body})

    async def _record_outcome(self, start: Message, body: bytes | None) -> None:
        """Finish the unit of work for the response ``start`` opened, then send ``start`` on.

        ``body`` is the whole body, or ``None`` when the response is not kept (streamed, or too large).
        """
        status = int(start["status"])
        headers = list(start.get("headers", ()))
        stored = 200 <= status < 400 or status in self._settings.store_statuses
        self._open = False
        try:
            if stored:
                kept = select_headers(headers, self._settings.stored_headers)
                if body is None:
                    kept = tuple(pair for pair in kept if pair[0] not in _REPRESENTATION)
                response = HTTPResponse(status=status, headers=kept, body=body or b"", body_stored=body is not None)
                try:
                    (self._uow.complete if status < 400 else self._uow.fail)(response)
                except BaseException as exc:
                    await self._uow.rollback(exc)  # nothing was recorded
                    raise
                await self._uow.commit()
            else:
                await self._uow.rollback(_NotStored())
        except BaseException as exc:
            self._failure = exc
            raise
        if not stored or body is None:
            headers.append(NOT_STORED)
        self._replied = True
        await self._downstream({**start, "headers": headers})

    async def _check_session_left_alone(self) -> None:
        """Refuse writes made through the unit of work's session after its outcome was recorded.

        Those writes (a background task's, say) are in no transaction that will commit: roll them back,
        and say so rather than lose them silently.
        """
        session = self._uow.session
        if session.in_transaction() or session.new or session.dirty or session.deleted:
            await session.close()
            raise UnitOfWorkError(
                "the application used the unit of work's session after its response was recorded; "
                "what it did there was rolled back"
            )
