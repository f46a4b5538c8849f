"""instrument(): attach metrics and checkout spans to one engine's pool.

Everything is decided here, once, so the pool's hot path finds either
nothing at all (no provider can ever record), a ``Pending`` stand-in (the
SDK may still be installed), or a ready ``PoolTelemetry``.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from opentelemetry import metrics, trace
from sqlalchemy.ext.asyncio import AsyncEngine

from ..engine import pool_of
from ..errors import ConfigurationError
from . import semconv as sc
from ._instruments import PoolReader, instruments_for
from ._observer import Pending, PoolTelemetry
from ._providers import Kind, meter_provider_kind, tracer_provider_kind
from ._spans import CheckoutSpans, span_attributes

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .._pool import PoolObserver, PoolState
    from ._instruments import PoolInstruments

__all__ = ["Instrumentation", "SpanMode", "instrument"]

logger = logging.getLogger("asyncpool.telemetry")

#: ``off``: no checkout spans. ``slow`` (default): a span for a checkout that
#: queued (with ``slow_threshold`` > 0: that took at least that long), timed
#: out, was refused or pre-pinged a dead connection. ``all``: every checkout.
SpanMode = Literal["off", "slow", "all"]

#: Default ``slow_threshold``: a span costs ~20 us, and under steady overload
#: nearly every checkout queues briefly; spans for waits this long or longer
#: (plus every timeout, refusal and failed pre-ping) keep traces useful
#: without taxing each request (benchmarks/RESULTS.md, hot-path profile).
DEFAULT_SLOW_THRESHOLD: Final = 0.1


class Instrumentation:
    """What ``instrument()`` attached to one engine; ``uninstrument()`` detaches it.

    ``active`` tells whether anything is attached now: ``False`` when neither
    provider can ever record (telemetry costs the pool nothing then), or
    after ``uninstrument()``.
    """

    def __init__(
        self,
        engine: Engine,
        state: PoolState,
        meter_provider: metrics.MeterProvider | None,
        tracer_provider: trace.TracerProvider | None,
        spans: SpanMode,
        slow_threshold: float,
    ) -> None:
        self._engine = weakref.ref(engine)  # the handle must not keep the engine alive
        self._url = engine.url
        self._state = state
        self._meter_provider = meter_provider
        self._tracer_provider = tracer_provider
        self._spans = spans
        self._slow_threshold = slow_threshold
        self._lock = threading.Lock()
        self._observer: PoolObserver | None = None
        self._reader: PoolReader | None = None
        self._instruments: PoolInstruments | None = None
        self._removed = False

    @property
    def pool_name(self) -> str:
        return self._state.name

    @property
    def active(self) -> bool:
        return self._observer is not None or self._reader is not None

    @property
    def pending(self) -> bool:
        """True while waiting for the application to install an SDK."""
        return isinstance(self._observer, Pending)

    def __repr__(self) -> str:
        if self._removed:
            status = "uninstrumented"
        elif self.pending:
            status = "pending"
        else:
            status = "active" if self.active else "inactive (no-op providers)"
        return f"<Instrumentation pool={self.pool_name!r} spans={self._spans!r} {status}>"

    def uninstrument(self) -> None:
        """Detach from the pool: no more metric points or spans. Idempotent."""
        with self._lock:
            self._removed = True
            self._detach()

    # ---------------------------------------------------------------- internal

    def _install(self) -> None:
        with self._lock:
            if self._removed:
                return
            self._detach()
            observer = self._build()
            if observer is not None:
                self._observer = observer
                self._state.add_observer(observer)

    def _detach(self) -> None:
        if self._observer is not None:
            self._state.remove_observer(self._observer)
            if isinstance(self._observer, PoolTelemetry):
                self._observer.flush()  # what was recorded is still reported
            self._observer = None
        if self._reader is not None and self._instruments is not None:
            self._instruments.remove(self._reader)
        self._reader = self._instruments = None

    def _build(self) -> PoolObserver | None:
        meters = meter_provider_kind(self._meter_provider)
        tracers = tracer_provider_kind(self._tracer_provider)
        if self._spans == "off":
            tracers = Kind.NOOP
        if Kind.REAL not in (meters, tracers):
            if Kind.UNSET in (meters, tracers):
                return Pending(self, self._activate)
            return None
        # At least one side is real. An unset side goes through the global
        # proxy, which OpenTelemetry binds to the SDK once it is installed.
        state, engine = self._state, self._engine()
        if engine is None:
            return None
        attributes = {sc.DB_CLIENT_CONNECTION_POOL_NAME: state.name}
        meter_provider = (
            metrics.NoOpMeterProvider()
            if meters is Kind.NOOP
            else self._meter_provider or metrics.get_meter_provider()
        )
        instruments = instruments_for(meter_provider)
        if meters is not Kind.NOOP:
            reader = PoolReader(engine, attributes)
            instruments.add(reader)
            self._reader, self._instruments = reader, instruments
        checkout_spans = None
        if tracers is not Kind.NOOP:
            from .. import __version__

            tracer = (self._tracer_provider or trace.get_tracer_provider()).get_tracer(
                sc.INSTRUMENTATION_SCOPE, __version__
            )
            checkout_spans = CheckoutSpans(tracer, span_attributes(self._url, state.name))
        return PoolTelemetry(
            self,
            instruments,
            attributes,
            checkout_spans,
            span_all=self._spans == "all",
            slow_threshold=self._slow_threshold,
        )

    def _activate(self) -> PoolObserver | None:
        """Called by ``Pending`` once a global provider is installed: swap in the real one."""
        with self._lock:
            pending = self._observer
            if not isinstance(pending, Pending):
                return pending  # another thread swapped it already, or uninstrumented
            self._state.remove_observer(pending)
            self._observer = self._build()
            if self._observer is not None:
                self._state.add_observer(self._observer)
            logger.debug("pool %r: a global OpenTelemetry provider was installed", self.pool_name)
            return self._observer


def instrument(
    engine: AsyncEngine | Engine,
    meter_provider: metrics.MeterProvider | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    *,
    spans: SpanMode = "slow",
    slow_threshold: float = DEFAULT_SLOW_THRESHOLD,
) -> Instrumentation:
    """Report an engine's pool through OpenTelemetry: metrics and checkout spans.

    ``meter_provider`` / ``tracer_provider`` default to the global ones; until
    the application installs an SDK they record nothing, and the engine
    starts reporting as soon as it does. An engine is instrumented at most
    once: calling this again (``create_pooled_engine`` already did, with the
    defaults) replaces the previous instrumentation, so nothing is counted
    twice.

    ``spans`` and ``slow_threshold`` (seconds) choose which checkouts get a
    span; see ``SpanMode``. Raises ``ConfigurationError`` for a bad value and
    ``AsyncPoolError`` for an engine not made by ``create_pooled_engine``.
    """
    if spans not in get_args(SpanMode):
        raise ConfigurationError("spans", spans, "'off', 'slow' or 'all'")
    if (
        isinstance(slow_threshold, bool)
        or not isinstance(slow_threshold, int | float)
        or not math.isfinite(slow_threshold)
        or slow_threshold < 0
    ):
        raise ConfigurationError(
            "slow_threshold", slow_threshold, "a finite number of seconds >= 0"
        )
    pool = pool_of(engine)
    sync_engine: Engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    state = pool.state
    for observer in state.observers:
        owner: Any = getattr(observer, "owner", None)
        if isinstance(owner, Instrumentation):
            owner.uninstrument()
    handle = Instrumentation(
        sync_engine, state, meter_provider, tracer_provider, spans, float(slow_threshold)
    )
    handle._install()
    return handle
