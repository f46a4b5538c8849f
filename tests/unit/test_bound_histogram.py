"""The bound histograms export exactly what the public ``Histogram.record`` exports.

Each test builds two identical SDK setups (same readers, views, temporality,
exemplar filter), feeds the same values to one through the public API and to
the other through ``bind_histogram``, and compares everything exported at
every collection except timestamps.
"""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.metrics._internal import _ProxyMeter
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics._internal.exemplar import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    ExemplarFilter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import (
    DropAggregation,
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
    View,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from asyncpool.telemetry import _bound
from asyncpool.telemetry._bound import DISABLE_ENV, BoundHistogram, bind_histogram, flush_all

NAME = "db.client.connection.wait_time"
POOL_A = {"db.client.connection.pool.name": "primary"}
POOL_B = {"db.client.connection.pool.name": "replica"}
VALUES = (0.0, 0.0004, 0.002, 0.002, 0.03, 0.7, 1.5, 12.0, 0.0001)

DELTA = {Histogram: AggregationTemporality.DELTA}


def readers_cumulative() -> list[InMemoryMetricReader]:
    return [InMemoryMetricReader()]


def readers_delta() -> list[InMemoryMetricReader]:
    return [InMemoryMetricReader(preferred_temporality=DELTA)]


def readers_both() -> list[InMemoryMetricReader]:
    return [InMemoryMetricReader(), InMemoryMetricReader(preferred_temporality=DELTA)]


def export(readers: Sequence[InMemoryMetricReader]) -> list[Any]:
    """Everything one collection of each reader exports, minus timestamps."""
    out: list[Any] = []
    for reader in readers:
        data = reader.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    points = sorted(map(_without_times, metric.data.data_points), key=repr)
                    out.append((metric.name, metric.unit, type(metric.data).__name__, points))
    return out


def _without_times(point: Any) -> Any:
    fields = {k: v for k, v in vars(point).items() if "time_unix_nano" not in k}
    exemplars = fields.pop("exemplars", ())
    fields["exemplars"] = sorted(
        ((dict(e.filtered_attributes or {}), e.value, e.span_id, e.trace_id) for e in exemplars),
        key=repr,
    )
    fields["attributes"] = dict(fields.get("attributes") or {})
    if "sum" in fields:
        # Pre-aggregation adds the same values in another order: float
        # addition is not associative, so compare sums to 12 significant digits.
        fields["sum"] = float(f"{fields['sum']:.12g}")
    for key, value in list(fields.items()):
        if hasattr(value, "bucket_counts"):  # exponential buckets
            fields[key] = (value.offset, list(value.bucket_counts))
        elif isinstance(value, tuple | list) and key != "exemplars":
            fields[key] = list(value)
    return sorted(fields.items())


Setup = Callable[[], tuple[MeterProvider, list[InMemoryMetricReader]]]


def setup(
    readers: Callable[[], list[InMemoryMetricReader]] = readers_cumulative,
    views: Sequence[View] = (),
    exemplar_filter: ExemplarFilter | None = None,
) -> Setup:
    def make() -> tuple[MeterProvider, list[InMemoryMetricReader]]:
        made = readers()
        provider = MeterProvider(
            metric_readers=made,
            views=views,
            exemplar_filter=exemplar_filter,
            shutdown_on_exit=False,
        )
        return provider, made

    return make


def run_one(
    make: Setup,
    feed: Callable[[Callable[[float, dict[str, Any]], None]], None],
    bound: bool,
    collect_between: bool,
) -> tuple[list[Any], list[BoundHistogram]]:
    """Feed the values one way; the export of each collection, and the recorders used."""
    provider, readers = make()
    meter = provider.get_meter("asyncpool")
    histogram = meter.create_histogram(NAME, unit="s")
    recorders: dict[str, BoundHistogram] = {}
    exports: list[Any] = []

    def flush_before_collection(options: CallbackOptions) -> list[Observation]:
        # As PoolInstruments' observable callbacks do.
        for recorder in recorders.values():
            recorder.flush()
        return []

    meter.create_observable_gauge("flush", callbacks=[flush_before_collection])

    def record(value: float, attributes: dict[str, Any]) -> None:
        if bound:
            key = attributes["db.client.connection.pool.name"]
            if key not in recorders:
                recorders[key] = BoundHistogram(histogram, attributes)
            recorders[key](value)
        else:
            histogram.record(value, attributes)
        if collect_between:
            exports.append(export(readers))

    feed(record)
    exports.append(export(readers))
    return exports, list(recorders.values())


def run_both(
    make: Setup,
    feed: Callable[[Callable[[float, dict[str, Any]], None]], None],
    *,
    collect_between: bool = False,
) -> tuple[list[Any], list[Any], list[BoundHistogram]]:
    """Feed the same values both ways: the exports of the public way, of the bound way."""
    public, _ = run_one(make, feed, False, collect_between)
    bound, recorders = run_one(make, feed, True, collect_between)
    return public, bound, recorders


def feed_two_pools(record: Callable[[float, dict[str, Any]], None]) -> None:
    for value in VALUES:
        record(value, POOL_A)
        record(value * 2, POOL_B)


SETUPS = {
    "cumulative": setup(),
    "delta": setup(readers_delta),
    "cumulative and delta readers": setup(readers_both),
    "view keeping no attributes": setup(views=[View(instrument_name=NAME, attribute_keys=set())]),
    "renamed view with its own buckets": setup(
        views=[
            View(
                instrument_name=NAME,
                name="renamed",
                aggregation=ExplicitBucketHistogramAggregation((0.001, 0.01, 0.1, 1.0)),
            )
        ]
    ),
    "two views of one instrument": setup(
        views=[
            View(instrument_name=NAME, name="first"),
            View(instrument_name=NAME, name="second", attribute_keys={"nothing"}),
        ]
    ),
    "exponential histogram": setup(
        views=[View(instrument_name=NAME, aggregation=ExponentialBucketHistogramAggregation())]
    ),
    "one view dropped, one kept": setup(
        views=[
            View(instrument_name=NAME, aggregation=DropAggregation()),
            View(instrument_name=NAME, name="kept"),
        ]
    ),
    "cardinality limit 1": setup(
        views=[View(instrument_name=NAME, aggregation_cardinality_limit=1)]
    ),
    "exemplars always off": setup(exemplar_filter=AlwaysOffExemplarFilter()),
}


#: How values reach each setup's aggregations: pre-aggregated locally when
#: every view shares one set of explicit buckets, else value by value.
MODES = {
    "one view dropped, one kept": "direct",
    "exponential histogram": "direct",
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_bound_records_export_what_public_records_export(name: str) -> None:
    public, bound, recorders = run_both(SETUPS[name], feed_two_pools)
    assert public and public[0], "the setup exported nothing to compare"
    assert bound == public
    assert {r.mode for r in recorders} == {MODES.get(name, "local")}


@pytest.mark.parametrize("name", ["delta", "cumulative and delta readers", "cardinality limit 1"])
def test_collections_between_records_do_not_lose_or_repeat_values(name: str) -> None:
    public, bound, recorders = run_both(SETUPS[name], feed_two_pools, collect_between=True)
    assert len(public) == 2 * len(VALUES) + 1
    assert bound == public
    assert {r.mode for r in recorders} == {"local"}


@pytest.mark.parametrize(
    "exemplar_filter", [None, AlwaysOnExemplarFilter()], ids=["trace_based", "always_on"]
)
def test_exemplars_and_points_match_the_public_path_in_and_out_of_spans(
    exemplar_filter: ExemplarFilter | None,
) -> None:
    sampled = TracerProvider(sampler=ALWAYS_ON).get_tracer("sampled")
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("unsampled")

    def feed_in_and_out_of_spans(record: Callable[[float, dict[str, Any]], None]) -> None:
        for index, value in enumerate(VALUES):
            tracer = (sampled, unsampled, None)[index % 3]
            if tracer is None:
                record(value, POOL_A)
                continue
            with tracer.start_as_current_span(f"checkout {index}"):
                record(value, POOL_A)

    public, bound, recorders = run_both(
        setup(exemplar_filter=exemplar_filter), feed_in_and_out_of_spans
    )

    def split(exports: list[Any]) -> tuple[list[Any], list[Any]]:
        """(each point without its exemplars, each point's exemplars as (value, has a trace))."""
        without, exemplars = [], []
        for _name, _unit, _kind, points in exports[-1]:
            for point in points:
                fields = dict(point)
                exemplars.append(sorted((e[1], bool(e[3])) for e in fields.pop("exemplars")))
                without.append(fields)
        return without, exemplars

    assert split(bound) == split(public)
    (exemplars,) = split(public)[1]
    if exemplar_filter is None:  # trace_based: only values recorded in a sampled span
        assert exemplars and all(traced for _value, traced in exemplars)
        assert {v for v, _ in exemplars} <= set(VALUES[0::3])
    assert {r.mode for r in recorders} == {"local"}


def only_point(reader: InMemoryMetricReader, *recorders: BoundHistogram) -> Any:
    """The one point ``reader`` collects, after the recorders flushed (as collections do)."""
    for recorder in recorders:
        recorder.flush()
    data = reader.get_metrics_data()
    assert data is not None
    (point,) = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    return point


def test_public_and_bound_records_of_one_attribute_set_share_one_series() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    histogram = provider.get_meter("m").create_histogram(NAME)
    record = BoundHistogram(histogram, POOL_A)
    histogram.record(1.0, dict(POOL_A))
    record(2.0)
    histogram.record(4.0, dict(POOL_A))
    point = only_point(reader, record)
    assert (point.count, point.sum, dict(point.attributes or {})) == (3, 7.0, POOL_A)
    assert record.bound


def test_a_reader_added_or_removed_after_binding_is_followed() -> None:
    first, second = InMemoryMetricReader(), InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[first], shutdown_on_exit=False)
    record = BoundHistogram(provider.get_meter("m").create_histogram(NAME), POOL_A)
    record(1.0)
    provider.add_metric_reader(second)
    record(2.0)
    provider.remove_metric_reader(first)
    record(3.0)

    point = only_point(second, record)
    assert (point.count, point.sum) == (2, 5.0)
    assert record.bound


def test_a_proxy_records_nothing_until_an_sdk_is_set_then_records_through_it() -> None:
    proxy_meter = _ProxyMeter("asyncpool")
    record = BoundHistogram(proxy_meter.create_histogram(NAME), POOL_A)
    record(1.0)
    assert not record.bound
    reader = InMemoryMetricReader()
    proxy_meter.on_set_meter_provider(
        MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    )
    record(2.0)
    record(4.0)
    point = only_point(reader, record)
    assert (point.count, point.sum) == (2, 6.0)
    assert record.bound


def test_negative_and_non_finite_values_take_the_public_path_and_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def feed_bad(record: Callable[[float, dict[str, Any]], None]) -> None:
        for value in (0.5, -1.0, float("nan"), float("inf"), 0.25):
            record(value, POOL_A)

    with caplog.at_level(logging.WARNING):
        public, bound, _ = run_both(setup(), feed_bad)
    assert bound == public
    assert sum("Histogram" in r.getMessage() for r in caplog.records) == 2 * 3


def test_a_surprise_at_record_time_switches_to_the_public_path_for_good() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    record = BoundHistogram(provider.get_meter("m").create_histogram(NAME), POOL_A)
    record(1.0)
    assert record.bound
    record._instrument = None  # an SDK internal not as expected
    record(100.0)  # lost: never counted twice
    assert not record.bound
    record(2.0)
    record(4.0)
    assert not record.bound
    point = only_point(reader, record)
    assert (point.count, point.sum) == (3, 7.0)


def test_a_failed_flush_drops_only_what_it_held_and_switches_to_the_public_path() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    record = BoundHistogram(provider.get_meter("m").create_histogram(NAME), POOL_A)
    record(1.0)
    assert record.mode == "local"
    record._targets = ((object(), None, {}),)  # an SDK internal not as expected
    record.flush()  # 1.0 is lost with it
    assert record.mode == "public"
    record(2.0)
    point = only_point(reader, record)
    assert (point.count, point.sum) == (1, 2.0)


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
def test_a_series_starts_at_its_first_value_not_at_the_collection(temporality: str) -> None:
    reader = InMemoryMetricReader(preferred_temporality=DELTA if temporality == "delta" else {})
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    record = BoundHistogram(provider.get_meter("m").create_histogram(NAME), POOL_A)
    before = time.time_ns()
    record(0.5)
    after = time.time_ns()
    point = only_point(reader, record)
    assert record.mode == "local"
    assert before <= point.start_time_unix_nano <= after


#: Engine A reports through the global proxy (metrics not installed yet),
#: engine B through provider P, which is then installed globally: the SDK
#: drops the callbacks of A's (duplicate) observable instruments, so A's
#: histograms must be flushed by B's collection.
PROXY_THEN_INSTALLED = """
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from asyncpool.engine import create_pooled_engine, pool_of
from asyncpool.telemetry import instrument

trace.set_tracer_provider(TracerProvider())
url = "postgresql+asyncpg://u@127.0.0.1:1/db"  # never connected to
a = create_pooled_engine(url, telemetry=False, name="A")
b = create_pooled_engine(url, telemetry=False, name="B")
instrument(a)
reader = InMemoryMetricReader()
provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
instrument(b, meter_provider=provider)
metrics.set_meter_provider(provider)
for engine in (a, b):
    for observer in pool_of(engine).state.observers:
        observer.checked_out(0.002, False, None)
        observer.checked_in(0.01)
seen = {}
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for metric in sm.metrics:
            if metric.name == "db.client.connection.wait_time":
                for point in metric.data.data_points:
                    seen[point.attributes["db.client.connection.pool.name"]] = point.count
print(sorted(seen.items()))
"""


def test_histograms_of_pools_whose_callbacks_the_sdk_dropped_are_still_flushed() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROXY_THEN_INSTALLED],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "[('A', 1), ('B', 1)]", result.stderr


@pytest.mark.parametrize("readers", [readers_cumulative, readers_delta])
def test_a_histogram_dropped_before_a_collection_still_exports_its_values(
    readers: Callable[[], list[InMemoryMetricReader]],
) -> None:
    def run(bound: bool) -> list[Any]:
        provider, made = setup(readers)()
        meter = provider.get_meter("asyncpool")
        histogram = meter.create_histogram(NAME, unit="s")

        def flush_before_collection(options: CallbackOptions) -> list[Observation]:
            flush_all()  # as PoolInstruments does
            return []

        meter.create_observable_gauge("flush", callbacks=[flush_before_collection])
        if bound:
            recorder = BoundHistogram(histogram, POOL_A)
            for value in VALUES:
                recorder(value)
            assert recorder.mode == "local"
            del recorder  # its engine went away between two collections
            gc.collect()
        else:
            for value in VALUES:
                histogram.record(value, POOL_A)
        return export(made)

    assert run(bound=True) == run(bound=False)


def test_a_disabled_meter_records_nothing_either_way() -> None:
    from opentelemetry.sdk.metrics._internal import _disable_meter_configurator

    def disabled() -> tuple[MeterProvider, list[InMemoryMetricReader]]:
        provider, readers = setup()()
        provider._set_meter_configurator(meter_configurator=_disable_meter_configurator)
        return provider, readers

    def feed_and_enable_none(record: Callable[[float, dict[str, Any]], None]) -> None:
        for value in VALUES:
            record(value, POOL_A)

    public, bound, _ = run_both(disabled, feed_and_enable_none)
    assert bound == public == [[]]


def test_the_environment_switch_keeps_the_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    histogram = provider.get_meter("m").create_histogram(NAME)
    assert isinstance(bind_histogram(histogram, POOL_A), BoundHistogram)
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert not isinstance(bind_histogram(histogram, POOL_A), BoundHistogram)


def test_the_self_check_passes_on_the_installed_sdk() -> None:
    # If this fails, the installed SDK changed its internals: asyncpool
    # still works (public path), but the benchmark's telemetry cost rises.
    assert _bound._self_check()
