"""The pool instruments: created once per meter provider, shared by every pool.

Current state (connections idle and used, limits, callers waiting) is *read*
from the pool when the metrics are collected, through observable
instruments, so a checkout pays nothing for it. Only what happens (a wait, a
use, a connect, a timeout, ...) is recorded as it happens, into histograms and
counters.

The SDK returns the existing instrument, without the new callback, when an
instrument name is created twice on one meter. So each meter provider gets
one set of instruments whose callbacks walk all the pools registered with it.
The callbacks may run on an exporter thread: they only read integers and
take snapshots, never touch a connection.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from . import semconv as sc
from ._bound import flush_all

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .._pool import FairAsyncPool

__all__ = ["SPECS", "InstrumentSpec", "PoolInstruments", "PoolReader", "instruments_for"]


@dataclass(frozen=True, slots=True)
class InstrumentSpec:
    """What one instrument is: name, kind (as the conventions spell it), unit, description."""

    name: str
    kind: str  # "counter" | "updowncounter" | "histogram"
    unit: str
    description: str


SPECS: Final[tuple[InstrumentSpec, ...]] = (
    InstrumentSpec(
        sc.DB_CLIENT_CONNECTION_COUNT,
        "updowncounter",
        sc.UNIT_CONNECTION,
        "The number of connections that are currently in state described by the `state` attribute.",
    ),
    InstrumentSpec(
        sc.DB_CLIENT_CONNECTION_IDLE_MAX,
        "updowncounter",
        sc.UNIT_CONNECTION,
        "The maximum number of idle open connections allowed.",
    ),
    InstrumentSpec(
        sc.DB_CLIENT_CONNECTION_IDLE_MIN,
        "updowncounter",
        sc.UNIT_CONNECTION,
        "The minimum number of idle open connections allowed.",
    ),
    InstrumentSpec(
        sc.DB_CLIENT_CONNECTION_MAX,
        "updowncounter",
        sc.UNIT_CONNECTION,
        "The maximum number of open connections allowed.",
    ),
    InstrumentSpec(
        sc.DB_CLIENT_CONNECTION_PENDING_REQUESTS,
        "updowncounter",
        sc.UNIT_REQUEST,
        "The number of current pending requests for an open connection.",
    ),
    InstrumentSpec(
        sc.DB_CLIENT_CONNECTION_TIMEOUTS,
        "counter",
        sc.UNIT_TIMEOUT,
        "The number of connection timeouts that have occurred trying to obtain a connection "
        "from the pool.",
    ),
    InstrumentSpec(
        sc.DB_CLIENT_CONNECTION_CREATE_TIME,
        "histogram",
        sc.UNIT_SECONDS,
        "The time it took to create a new connection.",
    ),
    InstrumentSpec(
        sc.DB_CLIENT_CONNECTION_WAIT_TIME,
        "histogram",
        sc.UNIT_SECONDS,
        "The time it took to obtain an open connection from the pool.",
    ),
    InstrumentSpec(
        sc.DB_CLIENT_CONNECTION_USE_TIME,
        "histogram",
        sc.UNIT_SECONDS,
        "The time between borrowing a connection and returning it to the pool.",
    ),
    InstrumentSpec(
        sc.ASYNCPOOL_PRE_PING_FAILURES,
        "counter",
        sc.UNIT_FAILURE,
        "Connections the pre-ping found dead and replaced before the caller saw them.",
    ),
    InstrumentSpec(
        sc.ASYNCPOOL_CONNECTION_INVALIDATIONS,
        "counter",
        sc.UNIT_CONNECTION,
        "Connections discarded as unusable, by reason.",
    ),
    InstrumentSpec(
        sc.ASYNCPOOL_CONNECTION_ERRORS,
        "counter",
        sc.UNIT_ERROR,
        "Failed attempts to open a new connection, by error type.",
    ),
    InstrumentSpec(
        sc.ASYNCPOOL_CHECKOUT_REJECTED,
        "counter",
        sc.UNIT_REQUEST,
        "Checkouts refused at once because max_waiting callers were already waiting.",
    ),
    InstrumentSpec(
        sc.ASYNCPOOL_CONNECTION_CLEANING,
        "updowncounter",
        sc.UNIT_CONNECTION,
        "Connections being put in order on the server (statement cancelled, rolled back) "
        "after their caller gave up; each keeps its slot, and counts as used.",
    ),
    InstrumentSpec(
        sc.ASYNCPOOL_CONNECTION_MAINTENANCE,
        "counter",
        sc.UNIT_CONNECTION,
        "What the pool's maintenance did in the background, by action: connections opened "
        "to keep min_idle, failed attempts, closed after idle_timeout, replaced at the end "
        "of their lifetime, found dead by the keepalive.",
    ),
)

#: ``asyncpool.maintenance.action`` -> the ``PoolCounters`` field it reports.
MAINTENANCE_ACTIONS: Final = {
    "refill": "refills",
    "refill_failure": "refill_failures",
    "idle_close": "idle_closes",
    "recycle": "background_recycles",
    "keepalive_failure": "keepalive_failures",
}

#: Bucket advice (seconds). The conventions give none for pool histograms;
#: these resolve a sub-millisecond hand-off as well as a multi-second stall.
WAIT_BUCKETS: Final = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
USE_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
CREATE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

_SPEC_BY_NAME: Final = {spec.name: spec for spec in SPECS}


class PoolReader:
    """Reads one engine's pool at collection time (the pool object changes on dispose).

    Holds the engine weakly: the instruments live as long as their meter
    provider, and must not keep an engine the application dropped alive.
    """

    __slots__ = ("_engine", "attributes", "idle_attributes", "used_attributes")

    def __init__(self, engine: Engine, attributes: dict[str, Any]) -> None:
        self._engine = weakref.ref(engine)
        self.attributes = attributes
        self.idle_attributes = {
            **attributes,
            sc.DB_CLIENT_CONNECTION_STATE: sc.DB_CLIENT_CONNECTION_STATE_IDLE,
        }
        self.used_attributes = {
            **attributes,
            sc.DB_CLIENT_CONNECTION_STATE: sc.DB_CLIENT_CONNECTION_STATE_USED,
        }

    def pool(self) -> FairAsyncPool | None:
        """The engine's current pool; ``None`` once the engine is gone."""
        engine = self._engine()
        if engine is None:
            return None
        pool: FairAsyncPool = engine.pool  # type: ignore[assignment]
        return pool


class PoolInstruments:
    """One meter provider's pool instruments and the pools they read."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._lock = threading.Lock()
        self._readers: tuple[PoolReader, ...] = ()
        self.wait_time = _histogram(meter, sc.DB_CLIENT_CONNECTION_WAIT_TIME, WAIT_BUCKETS)
        self.use_time = _histogram(meter, sc.DB_CLIENT_CONNECTION_USE_TIME, USE_BUCKETS)
        self.create_time = _histogram(meter, sc.DB_CLIENT_CONNECTION_CREATE_TIME, CREATE_BUCKETS)
        self.timeouts = _counter(meter, sc.DB_CLIENT_CONNECTION_TIMEOUTS)
        self.pre_ping_failures = _counter(meter, sc.ASYNCPOOL_PRE_PING_FAILURES)
        self.invalidations = _counter(meter, sc.ASYNCPOOL_CONNECTION_INVALIDATIONS)
        self.connection_errors = _counter(meter, sc.ASYNCPOOL_CONNECTION_ERRORS)
        self.rejected = _counter(meter, sc.ASYNCPOOL_CHECKOUT_REJECTED)
        self.observables = (
            _observable(meter, sc.DB_CLIENT_CONNECTION_COUNT, self._observe_count),
            _observable(meter, sc.DB_CLIENT_CONNECTION_MAX, self._observe_max),
            _observable(meter, sc.DB_CLIENT_CONNECTION_IDLE_MAX, self._observe_idle_max),
            _observable(meter, sc.DB_CLIENT_CONNECTION_IDLE_MIN, self._observe_idle_min),
            _observable(meter, sc.DB_CLIENT_CONNECTION_PENDING_REQUESTS, self._observe_pending),
            _observable(meter, sc.ASYNCPOOL_CONNECTION_CLEANING, self._observe_cleaning),
            _observable_counter(
                meter, sc.ASYNCPOOL_CONNECTION_MAINTENANCE, self._observe_maintenance
            ),
        )

    def add(self, reader: PoolReader) -> None:
        with self._lock:
            self._readers = (*self._readers, reader)

    def remove(self, reader: PoolReader) -> None:
        with self._lock:
            self._readers = tuple(r for r in self._readers if r is not reader)

    def _live(self) -> list[tuple[PoolReader, FairAsyncPool]]:
        """The pools still alive (an engine that was dropped stops being read)."""
        live, gone = [], []
        for reader in self._readers:  # a snapshot: add/remove replace the tuple
            pool = reader.pool()
            if pool is None:
                gone.append(reader)
            else:
                live.append((reader, pool))
        for reader in gone:
            self.remove(reader)
        return live

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        # The SDK runs every observable callback before it collects the
        # histograms, so this one hands the pools' pre-aggregated histogram
        # values over first (all of them: see flush_all).
        flush_all()
        out = []
        for reader, pool in self._live():
            out.append(Observation(max(pool.checkedout(), 0), reader.used_attributes))
            out.append(Observation(pool.live_idle(), reader.idle_attributes))
        return out

    def _observe_max(self, options: CallbackOptions) -> Iterable[Observation]:
        # No limit (max_overflow=-1): no maximum to report.
        return [
            Observation(p.max_size, r.attributes) for r, p in self._live() if p.max_size is not None
        ]

    def _observe_idle_max(self, options: CallbackOptions) -> Iterable[Observation]:
        # Overflow connections linger idle for idle_timeout: every slot may be idle.
        return [
            Observation(p.state.config.idle_capacity or p.max_size or 0, r.attributes)
            for r, p in self._live()
        ]

    def _observe_idle_min(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(p.state.config.effective_min_idle, r.attributes) for r, p in self._live()
        ]

    def _observe_pending(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(pool.waiting, r.attributes) for r, pool in self._live()]

    def _observe_cleaning(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(pool.cleaning, r.attributes) for r, pool in self._live()]

    def _observe_maintenance(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(
                getattr(pool.state.counters, field),
                {**r.attributes, sc.ASYNCPOOL_MAINTENANCE_ACTION: action},
            )
            for r, pool in self._live()
            for action, field in MAINTENANCE_ACTIONS.items()
        ]


_by_provider: weakref.WeakKeyDictionary[Any, PoolInstruments] = weakref.WeakKeyDictionary()
_by_provider_lock = threading.Lock()


def instruments_for(provider: metrics.MeterProvider) -> PoolInstruments:
    """The pool instruments of ``provider``, created on first use."""
    with _by_provider_lock:
        instruments = _by_provider.get(provider)
        if instruments is None and _is_global_proxy_target(provider):
            # Instruments made through the global proxy before the SDK was
            # installed now live on the installed provider: reuse them, since
            # creating the same names again would drop the new callbacks.
            instruments = _by_provider.get(_global_proxy())
        if instruments is None:
            from .. import __version__

            meter = provider.get_meter(sc.INSTRUMENTATION_SCOPE, __version__)
            instruments = PoolInstruments(meter)
        _by_provider[provider] = instruments
        return instruments


def _global_proxy() -> Any:
    from opentelemetry.metrics import _internal

    return _internal._PROXY_METER_PROVIDER


def _is_global_proxy_target(provider: metrics.MeterProvider) -> bool:
    from opentelemetry.metrics import _internal

    state: Any = _internal
    return state._METER_PROVIDER is provider


def _histogram(meter: metrics.Meter, name: str, buckets: tuple[float, ...]) -> metrics.Histogram:
    spec = _SPEC_BY_NAME[name]
    try:
        return meter.create_histogram(
            spec.name,
            unit=spec.unit,
            description=spec.description,
            explicit_bucket_boundaries_advisory=buckets,
        )
    except TypeError:
        # opentelemetry-api < 1.30 has no bucket advisory: the SDK's default
        # buckets apply (a View can set these); the metric is still reported.
        return meter.create_histogram(spec.name, unit=spec.unit, description=spec.description)


def _counter(meter: metrics.Meter, name: str) -> metrics.Counter:
    spec = _SPEC_BY_NAME[name]
    return meter.create_counter(spec.name, unit=spec.unit, description=spec.description)


def _observable_counter(
    meter: metrics.Meter, name: str, callback: Any
) -> metrics.ObservableCounter:
    spec = _SPEC_BY_NAME[name]
    return meter.create_observable_counter(
        spec.name, callbacks=[callback], unit=spec.unit, description=spec.description
    )


def _observable(meter: metrics.Meter, name: str, callback: Any) -> metrics.ObservableUpDownCounter:
    spec = _SPEC_BY_NAME[name]
    return meter.create_observable_up_down_counter(
        spec.name, callbacks=[callback], unit=spec.unit, description=spec.description
    )
