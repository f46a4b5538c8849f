"""Histograms bound to one pool's attributes, pre-aggregated between collections.

Every checkout feeds two histograms (``wait_time``, ``use_time``). Through the
public ``Histogram.record(value, attributes)`` of the OpenTelemetry Python
SDK (1.45) one call costs ~5 us, and most of that is attribute handling that
gives the same answer on every call for a pool: the Measurement cleans
(copies) the dict, then each view match copies it again, filters it by the
view's keys and hashes it into an aggregation key. The SDK takes no
pre-aggregated input and has no bound instruments. So ``bind_histogram``
does the attribute work once per pool, and then:

* **local** (the usual way): when every view aggregates the histogram into
  the same explicit buckets, a value is added to the pool's own buckets
  (a lock, a bisect, four additions: ~0.6 us) and ``flush()`` merges them
  into each view's aggregation at collection time. The pool instruments'
  observable callbacks call ``flush_all()``, and the SDK runs every
  observable callback before it collects the histograms, so each
  collection sees every value recorded before it. The first value after a
  flush still finds or creates the aggregations at once, so a series starts,
  and takes its cardinality slot, when record() would have made it. A
  histogram garbage-collected with its engine hands its values to the next
  ``flush_all()``, so an engine dropped between collections loses nothing.
* **direct**: a value the exemplar filter may want (by default: recorded in
  a sampled span), or any value when the views disagree on buckets
  (exponential, dropped, ...), goes straight into each view's aggregation
  with the SDK's exemplar decision and context: what ``record()`` does after
  the attribute work (~1.4 us).

Counts, buckets, min, max and exemplars are what ``record()`` exports; sums
may differ in the last bit (float additions in another order).

That walks SDK internals, so it is guarded three ways:

* it binds only to the exact SDK classes it was written against (the
  histogram, the measurement consumer, the reader storage, the view match,
  the explicit-bucket aggregation) and only if every internal it touches
  is there;
* once per process it proves itself on a private provider: values recorded
  both ways into one histogram must land in one series, with the data the
  public way alone exports (``_self_check``);
* it re-binds when a reader is added or removed, and any surprise switches
  that histogram to the public ``record()`` for good (a failed flush loses
  the values it held, logged; nothing is ever counted twice).

Anything else (no SDK, a proxy not yet bound to one, another SDK, a
non-finite or negative value, ``ASYNCPOOL_OTEL_BOUND_HISTOGRAMS=0``) goes
through the public ``record()``, unchanged. Equivalence with ``record()``
under views, delta and cumulative readers, several readers, cardinality
limits and exemplars: ``tests/unit/test_bound_histogram.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Mapping
from time import time_ns
from typing import Any, Final

from opentelemetry.context import get_current
from opentelemetry.util.types import AttributeValue

__all__ = ["BoundHistogram", "bind_histogram", "bound_histograms_enabled"]

logger = logging.getLogger("asyncpool.telemetry")

#: Set to ``0`` to always use the public ``Histogram.record`` (benchmarks compare both).
DISABLE_ENV: Final = "ASYNCPOOL_OTEL_BOUND_HISTOGRAMS"

Record = Callable[[float], None]
#: (view match, aggregation key, the attributes as that view keeps them)
Target = tuple[Any, Any, dict[str, AttributeValue]]


def bound_histograms_enabled() -> bool:
    """False when ``ASYNCPOOL_OTEL_BOUND_HISTOGRAMS=0``, or when the SDK failed the self-check."""
    return os.environ.get(DISABLE_ENV, "1") != "0" and _self_check()


def bind_histogram(histogram: Any, attributes: Mapping[str, AttributeValue]) -> Record:
    """A ``record(value)`` for ``histogram`` with these fixed attributes."""
    if not bound_histograms_enabled():
        return functools.partial(_public_record, histogram, dict(attributes))
    return BoundHistogram(histogram, attributes)


def _public_record(histogram: Any, attributes: dict[str, AttributeValue], value: float) -> None:
    histogram.record(value, attributes)


class _Measurement:
    """What aggregations and exemplar reservoirs read of the SDK's ``Measurement``.

    The SDK's is a frozen dataclass whose ``__post_init__`` cleans the
    attributes again; ours were cleaned once, at bind time.
    """

    __slots__ = ("attributes", "context", "instrument", "time_unix_nano", "value")

    def __init__(
        self, value: float, time_unix_nano: int, instrument: Any, context: Any, attributes: Any
    ) -> None:
        self.value = value
        self.time_unix_nano = time_unix_nano
        self.instrument = instrument
        self.context = context
        self.attributes = attributes


class _Buckets:
    """Pre-aggregated values not yet handed to the SDK: the histogram aggregation's state."""

    __slots__ = ("counts", "max", "min", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf


class BoundHistogram:
    """``record(value)`` into one SDK histogram for one fixed attribute set.

    Two ways in, chosen per value. When the exemplar filter wants the value
    (a sampled span is current, with the default filter), it goes straight
    into each view's aggregation with its context, as the SDK would take it.
    Otherwise, when every view aggregates into the same explicit buckets, it
    is added to local buckets (a lock, a bisect, four additions), and
    ``flush()`` merges those into the aggregations at collection time; the
    pool instruments' observable callbacks call it, and the SDK runs those
    before it collects the histograms.
    """

    __slots__ = (
        "__weakref__",
        "_attributes",
        "_boundaries",
        "_consumer",
        "_exemplar_filter",
        "_histogram",
        "_instrument",
        "_local",
        "_lock",
        "_may_sample",
        "_public",
        "_storages",
        "_targets",
    )

    def __init__(self, histogram: Any, attributes: Mapping[str, AttributeValue]) -> None:
        self._histogram = histogram
        self._attributes: dict[str, AttributeValue] = dict(attributes)
        self._public = False  # True once the fast path gave up on this histogram
        self._consumer: Any = None  # None: not bound (yet)
        self._storages: Any = None
        self._instrument: Any = None
        self._exemplar_filter: Any = None
        # A cheap, conservative "might the exemplar filter want this value?";
        # None: it never does. A yes sends the value the direct way, where
        # the filter itself decides.
        self._may_sample: Callable[[], bool] | None = None
        # (view match, aggregation key, the attributes as that view keeps them)
        self._targets: tuple[Target, ...] = ()
        # The buckets every view shares; None: no local pre-aggregation.
        self._boundaries: tuple[float, ...] | None = None
        self._local: _Buckets | None = None
        self._lock = threading.Lock()  # records run on a loop, flushes on an exporter thread
        with _registry_lock:
            _registry.add(self)

    @property
    def mode(self) -> str:
        """``"local"`` (pre-aggregated), ``"direct"`` (per value), ``"public"`` or ``"unbound"``."""
        if self._public:
            return "public"
        if self._consumer is None:
            return "unbound"
        return "direct" if self._boundaries is None else "local"

    @property
    def bound(self) -> bool:
        """True while records skip the public path (for tests and benchmarks)."""
        return self._consumer is not None and not self._public

    def __call__(self, value: float) -> None:
        consumer = self._consumer
        if (
            consumer is None
            or consumer._reader_storages is not self._storages
            or not 0.0 <= value < math.inf
        ):
            self._unbound(value)
            return
        try:
            if not self._instrument._is_enabled():
                return
            boundaries = self._boundaries
            may_sample = self._may_sample
            if boundaries is None or (may_sample is not None and may_sample()):
                self._record_direct(value)
                return
            if self._local is None:
                # The first value since the last flush: find or create each
                # view's aggregation now, as record() would, so that a new
                # series starts now and takes its cardinality slot now.
                self._each_aggregation(_touch)
            with self._lock:
                local = self._local
                if local is None:
                    local = self._local = _Buckets(len(boundaries) + 1)
                local.counts[bisect_left(boundaries, value)] += 1
                local.sum += value
                if value < local.min:
                    local.min = value
                if value > local.max:
                    local.max = value
        except Exception:
            # At most this one value is lost; never a double count.
            self._give_up("a record failed")

    def _record_direct(self, value: float) -> None:
        """One value into every aggregation, with the SDK's exemplar decision and context."""
        context = get_current()
        now = time_ns()
        attributes = self._attributes
        sample = self._exemplar_filter.should_sample(value, now, attributes, context)
        measurement = _Measurement(value, now, self._instrument, context, attributes)
        self._each_aggregation(lambda aggregation: aggregation.aggregate(measurement, sample))

    def flush(self) -> None:
        """Merge the locally pre-aggregated values into the SDK's aggregations."""
        if self._local is None:
            return
        with self._lock:
            local, self._local = self._local, None
        if local is None or not self._targets:
            return
        try:
            _merge(local, self._targets)
        except Exception:
            self._give_up(f"a flush failed; {sum(local.counts)} values lost")

    def __del__(self) -> None:
        # Dropped with its engine between two collections: hand what it holds
        # to the next flush_all(). Not merged here: a garbage collection can
        # run while the SDK holds the locks a merge takes.
        try:
            if self._local is not None and self._targets and not self._public:
                _dropped.append((self._local, self._targets))
        except Exception:  # interpreter shutdown: nothing left to export to
            pass

    def _each_aggregation(self, use: Callable[[Any], None]) -> None:
        _each_aggregation(self._targets, use)

    def _unbound(self, value: float) -> None:
        if not self._public and 0.0 <= value < math.inf and self._bind():
            self(value)
        else:
            self._histogram.record(value, self._attributes)

    def _bind(self) -> bool:
        """Resolve the SDK structures this histogram records into; False: use the public path."""
        # Values pre-aggregated for the readers there were go to those readers.
        self.flush()
        self._consumer = None
        try:
            instrument = _sdk_histogram(self._histogram)
            if instrument is None:
                return False  # a proxy not bound to an SDK yet: try again next time
            sdk = _sdk()
            consumer = instrument._measurement_consumer
            if type(consumer) is not sdk.SynchronousMeasurementConsumer:
                self._give_up(f"unknown measurement consumer {type(consumer).__name__}")
                return False
            storages = consumer._reader_storages
            targets = []
            shapes = set()
            for storage in storages.values():
                if type(storage) is not sdk.MetricReaderStorage:
                    self._give_up(f"unknown reader storage {type(storage).__name__}")
                    return False
                for match in storage._get_or_init_view_instrument_match(instrument):
                    if type(match) is not sdk.ViewInstrumentMatch:
                        self._give_up(f"unknown view match {type(match).__name__}")
                        return False
                    kept = self._attributes
                    keys = match._view._attribute_keys
                    if keys is not None:
                        kept = {k: v for k, v in kept.items() if k in keys}
                    targets.append((match, sdk.hash_attributes(kept), kept))
                    # The view's template aggregation: each attribute set gets one like it.
                    template = match._aggregation
                    if type(template) is sdk.ExplicitBucketHistogramAggregation:
                        shapes.add(template._boundaries)
                    else:
                        shapes.add(None)
            self._instrument = instrument
            self._exemplar_filter = consumer._sdk_config.exemplar_filter
            self._may_sample = _may_sample(self._exemplar_filter)
            self._targets = tuple(targets)
            only = shapes.pop() if len(shapes) == 1 else None
            self._boundaries = tuple(only) if only is not None else None
            self._storages = storages
            self._consumer = consumer
            return True
        except Exception:
            self._give_up("binding failed")
            return False

    def _give_up(self, why: str) -> None:
        if self._consumer is not None and not self._public:
            self._public = True
            self.flush()  # what was pre-aggregated still counts, if it can
        self._public = True
        self._consumer = None
        logger.debug(
            "histogram %s: %s; recording through the public API",
            getattr(self._histogram, "name", "?"),
            why,
            exc_info=True,
        )


_registry: weakref.WeakSet[BoundHistogram] = weakref.WeakSet()
_registry_lock = threading.Lock()
#: Pre-aggregated values of histograms that were garbage-collected (with
#: their engine) before a collection took them; the next ``flush_all`` does.
_dropped: collections.deque[tuple[_Buckets, tuple[Target, ...]]] = collections.deque()


def flush_all() -> None:
    """Flush every live ``BoundHistogram``: the pool instruments call this at each collection.

    All of them, not only the collecting provider's: the SDK silently drops
    the callbacks of an instrument created twice on one meter (which happens
    when engines were instrumented through the global proxy before the SDK
    was installed), and their histograms must not be held back for that.
    Then the values that histograms dropped since the last collection left.
    """
    with _registry_lock:
        histograms = list(_registry)
    for histogram in histograms:
        histogram.flush()
    while True:
        try:
            local, targets = _dropped.popleft()  # atomic: exporters may collect at once
        except IndexError:
            break
        try:
            _merge(local, targets)
        except Exception:
            logger.debug("a dropped histogram's %d values lost", sum(local.counts), exc_info=True)


def _merge(local: _Buckets, targets: tuple[Target, ...]) -> None:
    """Add pre-aggregated values to each view's aggregation, as ``record()`` would have."""

    def merge(aggregation: Any) -> None:
        if type(aggregation) is not _sdk().ExplicitBucketHistogramAggregation:
            raise TypeError(f"unexpected aggregation {type(aggregation).__name__}")
        with aggregation._lock:
            if aggregation._value is None:
                aggregation._value = aggregation._get_empty_bucket_counts()
            totals = aggregation._value
            for index, count in enumerate(local.counts):
                totals[index] += count
            aggregation._sum += local.sum
            if aggregation._record_min_max:
                aggregation._min = min(aggregation._min, local.min)
                aggregation._max = max(aggregation._max, local.max)

    _each_aggregation(targets, merge)


def _each_aggregation(targets: tuple[Target, ...], use: Callable[[Any], None]) -> None:
    """``use`` each view's aggregation for our attributes, found as
    ``_ViewInstrumentMatch.consume_measurement`` finds it once it has the key.

    A view match that resets on collection (delta) stays locked while
    ``use`` runs, as in the SDK, so a collection cannot take the
    aggregation away half-way.
    """
    for match, key, kept in targets:
        if match._reset_on_collect:
            with match._lock:
                use(match._get_or_create_aggregation(key, kept))
            continue
        aggregation = match._attributes_aggregation.get(key)
        if aggregation is None:
            with match._lock:
                aggregation = match._get_or_create_aggregation(key, kept)
        use(aggregation)


def _touch(aggregation: Any) -> None:
    pass


def _always() -> bool:
    return True


def _may_sample(exemplar_filter: Any) -> Callable[[], bool] | None:
    """A pre-check for ``exemplar_filter.should_sample`` that never says no when it would say yes.

    The SDK's default filter (trace_based) samples only inside a sampled
    span: its check is a chain of seven Python calls per value. Here it is
    one call and two C lookups in the usual case of no span.
    """
    sdk = _sdk()
    if type(exemplar_filter) is sdk.AlwaysOffExemplarFilter:
        return None
    if type(exemplar_filter) is not sdk.TraceBasedExemplarFilter:
        return _always  # AlwaysOn or unknown: let the filter decide each value
    try:
        from opentelemetry import context as otel_context
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
        from opentelemetry.trace import INVALID_SPAN, Span
        from opentelemetry.trace.propagation import _SPAN_KEY

        runtime: Any = otel_context._RUNTIME_CONTEXT
        if type(runtime) is not ContextVarsRuntimeContext:
            return _always
        current = runtime._current_context
    except (ImportError, AttributeError):
        return _always

    def in_sampled_span() -> bool:
        # trace.get_current_span(get_current()), then the filter's test.
        span = current.get().get(_SPAN_KEY)
        if span is None or not isinstance(span, Span) or span == INVALID_SPAN:
            return False
        return bool(span.get_span_context().trace_flags.sampled)

    return in_sampled_span


def _sdk_histogram(histogram: Any) -> Any:
    """The SDK histogram behind ``histogram`` (which may be the API's proxy), or None."""
    histogram = getattr(histogram, "_real_instrument", histogram)
    sdk = _sdk()
    if sdk is None or type(histogram) is not sdk.Histogram:
        return None
    return histogram


class _Sdk:
    """The SDK internals the fast path relies on, imported once."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics._internal import (
            aggregation,
            instrument,
            measurement_consumer,
        )
        from opentelemetry.sdk.metrics._internal import metric_reader_storage as storage
        from opentelemetry.sdk.metrics._internal._view_instrument_match import (
            _hash_attributes,
            _ViewInstrumentMatch,
        )
        from opentelemetry.sdk.metrics._internal.exemplar import (
            AlwaysOffExemplarFilter,
            TraceBasedExemplarFilter,
        )

        self.AlwaysOffExemplarFilter = AlwaysOffExemplarFilter
        self.TraceBasedExemplarFilter = TraceBasedExemplarFilter
        self.Histogram = instrument._Histogram
        self.ExplicitBucketHistogramAggregation = aggregation._ExplicitBucketHistogramAggregation
        self.SynchronousMeasurementConsumer = measurement_consumer.SynchronousMeasurementConsumer
        self.MetricReaderStorage = storage.MetricReaderStorage
        self.ViewInstrumentMatch = _ViewInstrumentMatch
        self.hash_attributes = _hash_attributes
        for cls, names in (
            (self.Histogram, ("_is_enabled",)),
            (self.MetricReaderStorage, ("_get_or_init_view_instrument_match",)),
            (self.ViewInstrumentMatch, ("_get_or_create_aggregation",)),
            (self.ExplicitBucketHistogramAggregation, ("_get_empty_bucket_counts",)),
        ):
            for name in names:
                if not callable(getattr(cls, name, None)):
                    raise ImportError(f"{cls.__name__}.{name} is missing")


@functools.cache
def _sdk() -> Any:
    try:
        return _Sdk()
    except Exception:
        logger.debug("OpenTelemetry SDK internals not as expected", exc_info=True)
        return None


@functools.cache
def _self_check() -> bool:
    """Record values both ways on a private provider; True if they land as the public way's."""
    if _sdk() is None:
        return False
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
        meter = provider.get_meter("asyncpool.self_check")
        attributes = {"db.client.connection.pool.name": "self-check"}
        # "mixed" gets each value once each way: one series with the same
        # data as "public" proves both ways reach the same aggregation.
        public, mixed = meter.create_histogram("public"), meter.create_histogram("mixed")
        record = BoundHistogram(mixed, attributes)
        for value in (0.0, 0.003, 7.5):
            public.record(value, attributes)
            public.record(value, attributes)
            mixed.record(value, attributes)
            record(value)
        record.flush()
        if not record.bound:
            return False
        data = reader.get_metrics_data()
        points: dict[str, Any] = {}
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    (point,) = metric.data.data_points
                    # Data points are dataclasses: equal but for the timestamps.
                    points[metric.name] = dataclasses.replace(
                        point, start_time_unix_nano=0, time_unix_nano=0
                    )
        ok = len(points) == 2 and points["public"] == points["mixed"]
    except Exception:
        logger.debug("bound histogram self-check failed", exc_info=True)
        return False
    if not ok:
        logger.debug("bound histogram self-check: %r", points)
    return ok
