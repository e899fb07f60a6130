"""Route guards for webhook senders: each provider's event id as the key, its own scope, a retention past its retries.

A webhook sender redelivers an event until it gets a 2xx; the event id names the event, so a redelivery
replays the first delivery's recorded response and its effect happens once. The body is not fingerprinted
(only the method and path are): the id is the sender's, not a client's guess, and a sender may
re-serialise an event it redelivers.

- Stripe: the event's ``id`` in the JSON body; 30 days. Stripe retries for up to 3 days, and an event can
  be resent by hand while Stripe keeps it (30 days).
- GitHub: ``X-GitHub-Delivery``; 14 days. GitHub does not redeliver by itself; a delivery can be
  redelivered by hand for the past 7 days (3 on some of GitHub's products), so twice the longest.
- Standard Webhooks: ``webhook-id``; 7 days. Svix, whose scheme the specification is, retries on a
  schedule of about 28 hours; senders may also replay by hand.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from ._extractors import header, json_field
from ._problems import DEFAULT_PROBLEMS
from ._route import RouteGuard

if TYPE_CHECKING:
    from .._barrier import Barrier
    from .._config import OnConflict, Retention
    from ._extractors import KeyExtractor
    from ._problems import Problems
    from ._request import FingerprintPart
    from ._response import HTTPResponse

__all__ = [
    "GITHUB_RETENTION",
    "STANDARD_WEBHOOKS_RETENTION",
    "STRIPE_RETENTION",
    "github_webhooks",
    "standard_webhooks",
    "stripe_webhooks",
]

STRIPE_RETENTION = timedelta(days=30)
"""How long a Stripe event's response replays: past its 3 days of retries, and its 30 days of manual resends."""
GITHUB_RETENTION = timedelta(days=14)
"""How long a GitHub delivery's response replays: past the 7 days in which a delivery can be redelivered."""
STANDARD_WEBHOOKS_RETENTION = timedelta(days=7)
"""How long a Standard Webhooks message's response replays: past its sender's retry schedule, with margin."""

_WEBHOOK_FINGERPRINT: tuple[FingerprintPart, ...] = ("method", "path")


def stripe_webhooks(
    barrier: Barrier[HTTPResponse],
    *,
    scope: str = "webhooks:stripe",
    retention: timedelta | Retention = STRIPE_RETENTION,
    on_conflict: OnConflict | None = None,
    problems: Problems = DEFAULT_PROBLEMS,
) -> RouteGuard:
    """A route guard for Stripe's webhook endpoint: the key is the event's ``id`` (``evt_…``) in the JSON body.

    An event without an ``id`` is a 400 ``key-missing``; a body that is not JSON, or an ``id`` that is not a
    string, a 400 ``key-invalid``. Verify the ``Stripe-Signature`` in a dependency of the route: it runs
    before the key is claimed.
    """
    return _guard(barrier, json_field("id"), scope, retention, on_conflict, problems)


def github_webhooks(
    barrier: Barrier[HTTPResponse],
    *,
    scope: str = "webhooks:github",
    retention: timedelta | Retention = GITHUB_RETENTION,
    on_conflict: OnConflict | None = None,
    problems: Problems = DEFAULT_PROBLEMS,
) -> RouteGuard:
    """A route guard for GitHub's webhooks: the key is the ``X-GitHub-Delivery`` header (a GUID per delivery).

    A redelivery keeps its delivery's GUID. Verify ``X-Hub-Signature-256`` in a dependency of the route.
    """
    return _guard(barrier, header("X-GitHub-Delivery"), scope, retention, on_conflict, problems)


def standard_webhooks(
    barrier: Barrier[HTTPResponse],
    *,
    scope: str = "webhooks:standard",
    retention: timedelta | Retention = STANDARD_WEBHOOKS_RETENTION,
    on_conflict: OnConflict | None = None,
    problems: Problems = DEFAULT_PROBLEMS,
) -> RouteGuard:
    """A route guard for a Standard Webhooks sender (Svix, …): the key is the ``webhook-id`` header.

    The specification keeps a message's ``webhook-id`` across its retries. Verify ``webhook-signature`` in a
    dependency of the route. Give each sender its own ``scope``: their ids are unique only per sender.
    """
    return _guard(barrier, header("webhook-id"), scope, retention, on_conflict, problems)


def _guard(
    barrier: Barrier[HTTPResponse],
    key: KeyExtractor,
    scope: str,
    retention: timedelta | Retention,
    on_conflict: OnConflict | None,
    problems: Problems,
) -> RouteGuard:
    """A sender's guard: its key, its scope and retention, and only the method and path fingerprinted."""
    return RouteGuard(
        barrier,
        scope=scope,
        key=key,
        retention=retention,
        fingerprint=_WEBHOOK_FINGERPRINT,
        on_conflict=on_conflict,
        problems=problems,
    )
