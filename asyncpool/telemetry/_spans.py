"""Checkout spans, made after the fact.

A span is wanted only for a checkout worth looking at (it queued, timed out,
was refused, or its pre-ping found a dead connection), and that is known only
once the checkout is over. So nothing is opened on the way in: the span is
created at the end with an explicit start time (now minus the wait) and ended
at once. A span can therefore never be left open, and a fast checkout costs
no span machinery at all. It is a child of whatever span is current in the
caller (SQLAlchemy's greenlet bridge carries the caller's context into the
pool), so it sits inside the request's trace.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from opentelemetry.trace import SpanKind, Status, StatusCode

from . import semconv as sc

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer
    from opentelemetry.util.types import AttributeValue
    from sqlalchemy.engine import URL

__all__ = ["CheckoutSpans", "error_type", "span_attributes"]

_NS: Final = 1_000_000_000


def error_type(exc: BaseException) -> str:
    """``error.type``: the fully qualified class name (builtins without a module)."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def span_attributes(url: URL, pool_name: str) -> dict[str, AttributeValue]:
    """Attributes every checkout span carries, from the URL's public parts only.

    Host, port and database name; never the user name, the password or the
    query string.
    """
    attributes: dict[str, AttributeValue] = {
        sc.DB_SYSTEM_NAME: sc.DB_SYSTEM_NAME_POSTGRESQL,
        sc.DB_CLIENT_CONNECTION_POOL_NAME: pool_name,
    }
    if url.database:
        attributes[sc.DB_NAMESPACE] = url.database
    if url.host:
        attributes[sc.SERVER_ADDRESS] = url.host
    if url.port is not None:
        attributes[sc.SERVER_PORT] = url.port
    return attributes


class CheckoutSpans:
    """Records one checkout span per call, for one pool."""

    __slots__ = ("_attributes", "_tracer")

    def __init__(self, tracer: Tracer, attributes: dict[str, AttributeValue]) -> None:
        self._tracer = tracer
        self._attributes = attributes

    def record(
        self,
        wait: float,
        queued: bool,
        *,
        ping_error: BaseException | None = None,
        error: BaseException | None = None,
    ) -> None:
        """A finished span for a checkout that took ``wait`` seconds and ends now.

        ``ping_error``: the pre-ping found the connection dead (an event; the
        checkout still succeeded). ``error``: the checkout failed (error
        status and ``error.type``).
        """
        end = time.time_ns()
        span = self._tracer.start_span(
            sc.CHECKOUT_SPAN_NAME,
            kind=SpanKind.INTERNAL,
            attributes=self._attributes,
            start_time=end - int(wait * _NS),
        )
        try:
            if span.is_recording():
                span.set_attribute(sc.ASYNCPOOL_CHECKOUT_WAIT, wait)
                span.set_attribute(sc.ASYNCPOOL_CHECKOUT_QUEUED, queued)
                if ping_error is not None:
                    span.add_event(
                        sc.PRE_PING_FAILED_EVENT,
                        {sc.EXCEPTION_TYPE: error_type(ping_error)},
                        timestamp=end,
                    )
                if error is not None:
                    span.set_attribute(sc.ERROR_TYPE, error_type(error))
                    span.set_status(Status(StatusCode.ERROR, str(error)))
        finally:
            span.end(end_time=end)
