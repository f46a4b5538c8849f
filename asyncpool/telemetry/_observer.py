"""The pool observers: what runs inside checkouts and checkins.

``PoolTelemetry`` is the one that records. Its per-checkout work is one
record into a histogram bound to the pool's attributes, and two float
comparisons that decide whether a span is wanted; everything else (spans,
counters, per-reason attributes) runs only on the rare paths.

``Pending`` stands in while the application has not installed an
OpenTelemetry SDK yet but still could: it records nothing and only checks
two module globals, and hands over to a ``PoolTelemetry`` once the SDK is
there, so an engine created before the SDK is set up still reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import PoolOverloadedError
from . import semconv as sc
from ._bound import BoundHistogram, bind_histogram
from ._providers import GlobalsWatch
from ._spans import error_type

if TYPE_CHECKING:
    from .._pool import PoolObserver
    from ._instruments import PoolInstruments
    from ._spans import CheckoutSpans

__all__ = ["Pending", "PoolTelemetry"]

logger = logging.getLogger("asyncpool.telemetry")


class Owner(Protocol):
    """The ``Instrumentation`` handle an observer belongs to."""

    def uninstrument(self) -> None: ...


class PoolTelemetry:
    """Records one pool's metrics and checkout spans (a ``PoolObserver``)."""

    __slots__ = (
        "_add_connection_error",
        "_add_invalidation",
        "_add_ping_failure",
        "_add_rejected",
        "_add_timeout",
        "_attributes",
        "_error_attributes",
        "_reason_attributes",
        "_record_create",
        "_record_use",
        "_record_wait",
        "_span_after",
        "_span_unqueued",
        "_spans",
        "owner",
    )

    def __init__(
        self,
        owner: Owner,
        instruments: PoolInstruments,
        attributes: dict[str, Any],
        spans: CheckoutSpans | None,
        *,
        span_all: bool,
        slow_threshold: float,
    ) -> None:
        self.owner = owner
        self._attributes = attributes
        # Bound methods looked up once: the hot path makes no attribute chase.
        # The two histograms fed on every checkout skip the SDK's per-call
        # attribute work (see _bound); the rest use the public API.
        self._record_wait = bind_histogram(instruments.wait_time, attributes)
        self._record_use = bind_histogram(instruments.use_time, attributes)
        self._record_create = instruments.create_time.record
        self._add_timeout = instruments.timeouts.add
        self._add_rejected = instruments.rejected.add
        self._add_ping_failure = instruments.pre_ping_failures.add
        self._add_invalidation = instruments.invalidations.add
        self._add_connection_error = instruments.connection_errors.add
        self._reason_attributes: dict[str, dict[str, Any]] = {}
        self._error_attributes: dict[type[BaseException], dict[str, Any]] = {}
        # Counters of rare events start at 0, so that every pool has the
        # series from the start (Prometheus' rate() needs the zero).
        for add in (self._add_timeout, self._add_rejected, self._add_ping_failure):
            add(0, attributes)
        self._spans = spans
        # A span for a successful checkout when wait >= _span_after and it
        # queued (or _span_unqueued): "slow" with threshold 0 is "every
        # checkout that queued"; a positive threshold counts any slow checkout.
        if spans is None:
            self._span_after, self._span_unqueued = math.inf, False
        elif span_all:
            self._span_after, self._span_unqueued = 0.0, True
        else:
            self._span_after, self._span_unqueued = slow_threshold, slow_threshold > 0

    def flush(self) -> None:
        """Hand the pre-aggregated histogram values to the SDK now (before detaching)."""
        for record in (self._record_wait, self._record_use):
            if isinstance(record, BoundHistogram):
                record.flush()

    def checked_out(self, wait: float, waited: bool, ping_error: BaseException | None) -> None:
        try:
            self._record_wait(wait)
            if ping_error is not None:
                self._add_ping_failure(1, self._attributes)
                if self._spans is not None:
                    self._spans.record(wait, waited, ping_error=ping_error)
            elif wait >= self._span_after and (waited or self._span_unqueued):
                if self._spans is not None:
                    self._spans.record(wait, waited)
        except Exception:
            logger.debug("telemetry failed to record a checkout", exc_info=True)

    def checkout_failed(self, wait: float, error: BaseException) -> None:
        try:
            rejected = isinstance(error, PoolOverloadedError)
            if rejected:
                self._add_rejected(1, self._attributes)
            else:
                self._add_timeout(1, self._attributes)
            if self._spans is not None:
                self._spans.record(wait, not rejected, error=error)
        except Exception:
            logger.debug("telemetry failed to record a failed checkout", exc_info=True)

    def checked_in(self, use: float) -> None:
        try:
            self._record_use(use)
        except Exception:
            logger.debug("telemetry failed to record a checkin", exc_info=True)

    def connected(self, seconds: float, error: BaseException | None) -> None:
        try:
            if error is None:
                self._record_create(seconds, self._attributes)
                return
            attributes = self._error_attributes.get(type(error))
            if attributes is None:
                attributes = {**self._attributes, sc.ERROR_TYPE: error_type(error)}
                self._error_attributes[type(error)] = attributes
            self._add_connection_error(1, attributes)
        except Exception:
            logger.debug("telemetry failed to record a connect", exc_info=True)

    def invalidated(self, reason: str) -> None:
        try:
            attributes = self._reason_attributes.get(reason)
            if attributes is None:
                attributes = {**self._attributes, sc.ASYNCPOOL_INVALIDATION_REASON: reason}
                self._reason_attributes[reason] = attributes
            self._add_invalidation(1, attributes)
        except Exception:
            logger.debug("telemetry failed to record an invalidation", exc_info=True)


class Pending:
    """Waits for the application to install an SDK; then hands over (a ``PoolObserver``)."""

    __slots__ = ("_activate", "_watch", "owner")

    def __init__(self, owner: Owner, activate: Callable[[], PoolObserver | None]) -> None:
        self.owner = owner
        self._activate = activate
        self._watch = GlobalsWatch()

    def _now_active(self) -> PoolObserver | None:
        if not self._watch.changed():
            return None
        return self._activate()

    def checked_out(self, wait: float, waited: bool, ping_error: BaseException | None) -> None:
        observer = self._now_active()
        if observer is not None:
            observer.checked_out(wait, waited, ping_error)

    def checkout_failed(self, wait: float, error: BaseException) -> None:
        observer = self._now_active()
        if observer is not None:
            observer.checkout_failed(wait, error)

    def checked_in(self, use: float) -> None:
        observer = self._now_active()
        if observer is not None:
            observer.checked_in(use)

    def connected(self, seconds: float, error: BaseException | None) -> None:
        observer = self._now_active()
        if observer is not None:
            observer.connected(seconds, error)

    def invalidated(self, reason: str) -> None:
        observer = self._now_active()
        if observer is not None:
            observer.invalidated(reason)
