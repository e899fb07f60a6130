"""The trace across the boundary: the W3C ``traceparent``/``tracestate`` of the unit of work that published a
message travel in its headers, and the consumer that applies it continues that trace.

Only where the application uses OpenTelemetry: the headers are written when ``opentelemetry.trace`` is
already imported (by the application's own setup) and a span is current, and read back when a message
carries them. Without OpenTelemetry nothing is imported and nothing is added; an unreadable ``traceparent``
is ignored (a new trace begins), never an error.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ["TRACE_HEADERS", "continued", "current_headers"]

TRACE_HEADERS = ("traceparent", "tracestate")
"""The W3C Trace Context headers a message carries (the propagator's own names)."""


def _in_use() -> bool:
    """Whether the application has imported OpenTelemetry's tracing API (we never import it first)."""
    return "opentelemetry.trace" in sys.modules


def current_headers() -> dict[str, bytes]:
    """The current span's context as headers, by the application's global propagator; empty when none."""
    if not _in_use():
        return {}
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {name: value.encode("latin-1") for name, value in carrier.items() if name in TRACE_HEADERS}


@contextmanager
def continued(headers: Sequence[tuple[str, bytes]]) -> Iterator[None]:
    """Make the trace that ``headers`` carry current within the block (where OpenTelemetry is in use)."""
    carried = {name: value for name, value in reversed(headers) if name in TRACE_HEADERS}  # the first counts
    if not carried or not _in_use():
        yield
        return
    from opentelemetry import context, propagate

    text: dict[str, str] = {}
    for name, value in carried.items():
        if isinstance(value, bytes):
            text[name] = value.decode("latin-1")
    token = context.attach(propagate.extract(text))
    try:
        yield
    finally:
        context.detach(token)
