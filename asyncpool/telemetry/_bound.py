"""Histograms bound to one pool's attributes: the SDK's work per record, minus attributes.

Every checkout feeds two histograms (``wait_time``, ``use_time``). Through the
public ``Histogram.record(value, attributes)`` of the OpenTelemetry Python
SDK (1.45) one call costs ~5.5 us, and most of that is attribute handling
that gives the same answer on every call for a pool: the Measurement cleans
(copies) the dict, then each view match copies it again, filters it by the
view's keys and hashes it into an aggregation key. The SDK takes no
pre-aggregated input and has no bound instruments, so ``bind_histogram``
does the attribute work once per pool and each record then does exactly
what the SDK does with its result: the exemplar filter's decision, then, for
every reader and view, the aggregation for that key (created as the SDK
creates it, with the view match's lock, cardinality limit and delta reset).
~1 us a record (``benchmarks/RESULTS.md``).

That walks SDK internals, so it is guarded three ways:

* it binds only to the exact SDK classes it was written against (the
  histogram, the synchronous measurement consumer, the reader storage, the
  view match) and only if every internal it touches is there;
* once per process it proves itself on a private provider: values recorded
  both ways into one histogram must land in one series, with the data the
  public way alone exports (``_self_check``);
* it re-binds when a reader is added or removed, and any surprise at record
  time switches that histogram to the public ``record()`` for good.

Anything else (no SDK, a proxy not yet bound to one, another SDK, a
non-finite or negative value, ``ASYNCPOOL_OTEL_BOUND_HISTOGRAMS=0``) goes
through the public ``record()``, unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from time import time_ns
from typing import Any, Final

from opentelemetry.context import get_current
from opentelemetry.util.types import AttributeValue

__all__ = ["BoundHistogram", "bind_histogram", "bound_histograms_enabled"]

logger = logging.getLogger("asyncpool.telemetry")

#: Set to ``0`` to always use the public ``Histogram.record`` (benchmarks compare both).
DISABLE_ENV: Final = "ASYNCPOOL_OTEL_BOUND_HISTOGRAMS"

Record = Callable[[float], None]


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
        "_attributes",
        "_boundaries",
        "_consumer",
        "_exemplar_filter",
        "_histogram",
        "_instrument",
        "_local",
        "_lock",
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
        # (view match, aggregation key, the attributes as that view keeps them)
        self._targets: tuple[tuple[Any, Any, dict[str, AttributeValue]], ...] = ()
        # The buckets every view shares; None: no local pre-aggregation.
        self._boundaries: tuple[float, ...] | None = None
        self._local: _Buckets | None = None
        self._lock = threading.Lock()  # records run on a loop, flushes on an exporter thread

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
            instrument = self._instrument
            if not instrument._is_enabled():
                return
            context = get_current()
            now = time_ns()
            sample = self._exemplar_filter.should_sample(value, now, self._attributes, context)
            boundaries = self._boundaries
            if boundaries is None or sample:
                self._aggregate(
                    _Measurement(value, now, instrument, context, self._attributes), sample
                )
                return
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

    def flush(self) -> None:
        """Merge the locally pre-aggregated values into the SDK's aggregations."""
        if self._local is None:
            return
        with self._lock:
            local, self._local = self._local, None
        if local is None or self._consumer is None:
            return
        try:
            for aggregation in self._aggregations():
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
        except Exception:
            self._give_up(f"a flush failed; {sum(local.counts)} values lost")

    def _aggregate(self, measurement: _Measurement, sample: bool) -> None:
        for aggregation in self._aggregations():
            aggregation.aggregate(measurement, sample)

    def _aggregations(self) -> Iterator[Any]:
        """Each view's aggregation for our attributes, as
        ``_ViewInstrumentMatch.consume_measurement`` finds it once it has the key.

        A view match that resets on collection (delta) is held locked while
        the caller uses the aggregation, as the SDK does, so that a
        collection cannot take the aggregation away half-way.
        """
        for match, key, kept in self._targets:
            if match._reset_on_collect:
                with match._lock:
                    yield match._get_or_create_aggregation(key, kept)
                continue
            aggregation = match._attributes_aggregation.get(key)
            if aggregation is None:
                with match._lock:
                    aggregation = match._get_or_create_aggregation(key, kept)
            yield aggregation

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
