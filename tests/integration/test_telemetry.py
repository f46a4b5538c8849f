"""Pool metrics and checkout spans against real PostgreSQL, read with SDK in-memory readers."""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import os
import socket
import sys
import weakref
from pathlib import Path

import pytest
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import NoOpTracerProvider, StatusCode
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncpool
from asyncpool import PoolOverloadedError, PoolTimeoutError
from asyncpool.engine import pool_of
from asyncpool.telemetry import Instrumentation, instrument
from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry._bound import bound_histograms_enabled
from tests.fix_db import (
    CONNECT_ERROR,
    REFUSED_ERROR_TYPES,
    EngineFactory,
    TestDatabase,
    wait_until,
)
from tests.fix_otlp import Otel
from tests.fix_proxy import FaultProxy, proxied_url

COUNT = sc.DB_CLIENT_CONNECTION_COUNT
USED = {"db__client__connection__state": "used"}
IDLE = {"db__client__connection__state": "idle"}


async def hold(engine: AsyncEngine, seconds: float) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        await asyncio.sleep(seconds)


async def test_twenty_tasks_on_two_connections_peak_at_two_used_and_eighteen_pending(
    make_engine: EngineFactory, otel: Otel, app_name: str
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0, pool_timeout=10)
    instrument(engine, otel.meter_provider, otel.tracer_provider)
    peaks = {"used": 0, "pending": 0}
    limits: set[int] = set()
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            metrics = otel.collect()
            used = otel.value(metrics, COUNT, app_name, **USED)
            pending = otel.value(metrics, sc.DB_CLIENT_CONNECTION_PENDING_REQUESTS, app_name)
            peaks["used"] = max(peaks["used"], used)
            peaks["pending"] = max(peaks["pending"], pending)
            limits.add(otel.value(metrics, sc.DB_CLIENT_CONNECTION_MAX, app_name))
            await asyncio.sleep(0.01)  # the sampling period

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(hold(engine, 0.1) for _ in range(20)))
    stop.set()
    await sampler

    assert peaks["used"] == 2
    assert limits == {2}
    assert 16 <= peaks["pending"] <= 18
    metrics = otel.collect()
    wait_time = otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_WAIT_TIME, app_name)
    assert wait_time.count == 20
    assert 0.85 <= wait_time.max <= 2.0  # the last waits 9 rounds of 100 ms (+ load)
    # ...pre-aggregated by the pool and merged at each collection (telemetry/_bound.py).
    # (On an SDK where the self-check fails, such as opentelemetry-sdk 1.27, the
    # public record() is used; test_bound_histogram.py, which runs on the
    # newest SDK only, asserts the self-check passes there.)
    (observer,) = pool_of(engine).state.observers
    if bound_histograms_enabled():
        assert observer._record_wait.mode == observer._record_use.mode == "local"
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_USE_TIME, app_name).count == 20
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_CREATE_TIME, app_name).count == 2
    assert otel.value(metrics, COUNT, app_name, **USED) == 0
    assert otel.value(metrics, COUNT, app_name, **IDLE) == 2
    assert otel.value(metrics, sc.DB_CLIENT_CONNECTION_PENDING_REQUESTS, app_name) == 0
    assert otel.value(metrics, sc.DB_CLIENT_CONNECTION_IDLE_MAX, app_name) == 2
    assert otel.value(metrics, sc.DB_CLIENT_CONNECTION_TIMEOUTS, app_name) == 0
    # Every checkout that queued, and only those, has a span.
    spans = otel.spans(app_name)
    assert len(spans) == 18
    assert all(s.attributes[sc.ASYNCPOOL_CHECKOUT_QUEUED] is True for s in spans)
    assert max(s.attributes[sc.ASYNCPOOL_CHECKOUT_WAIT] for s in spans) == wait_time.max


async def test_pool_timeout_counts_a_timeout_and_records_an_error_span_in_the_callers_trace(
    make_engine: EngineFactory, otel: Otel, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=0.2)
    instrument(engine, otel.meter_provider, otel.tracer_provider)
    async with engine.connect():
        with otel.tracer.start_as_current_span("request") as request:
            with pytest.raises(PoolTimeoutError):
                await engine.connect()

    metrics = otel.collect()
    assert otel.value(metrics, sc.DB_CLIENT_CONNECTION_TIMEOUTS, app_name) == 1
    (span,) = otel.spans(app_name)
    assert span.status.status_code is StatusCode.ERROR
    assert app_name in (span.status.description or "")
    assert span.attributes[sc.ERROR_TYPE] == "asyncpool.errors.PoolTimeoutError"
    assert span.attributes[sc.ASYNCPOOL_CHECKOUT_WAIT] >= 0.2
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    assert span.context.trace_id == request.get_span_context().trace_id
    assert span.start_time is not None and span.end_time is not None
    assert (span.end_time - span.start_time) / 1e9 >= 0.2
    assert otel.open_spans == 0


async def test_pre_ping_failures_on_terminated_backends_are_counted_and_shown_as_span_events(
    make_engine: EngineFactory, otel: Otel, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=3, max_overflow=0, pre_ping_skip_window=0)
    instrument(engine, otel.meter_provider, otel.tracer_provider)
    held = [await engine.connect() for _ in range(3)]
    for conn in held:
        await conn.execute(text("SELECT 1"))
        await conn.close()
    assert await database.terminate(app_name) == 3

    async def query() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT 1"))).scalar_one())

    assert await asyncio.gather(query(), query(), query()) == [1, 1, 1]  # no error to callers
    metrics = otel.collect()
    assert otel.value(metrics, sc.ASYNCPOOL_PRE_PING_FAILURES, app_name) == 3
    reasons = {
        p.attributes[sc.ASYNCPOOL_INVALIDATION_REASON]: p.value
        for p in otel.points(metrics, sc.ASYNCPOOL_CONNECTION_INVALIDATIONS, app_name)
    }
    assert reasons == {"pre_ping": 3}
    spans = otel.spans(app_name)
    events = [e for s in spans for e in s.events if e.name == sc.PRE_PING_FAILED_EVENT]
    assert len(events) == 3
    for event in events:
        # The driver's own class (asyncpg's state check finds the socket
        # closed: ConnectionError; psycopg reads the FATAL: AdminShutdown).
        exception_type = event.attributes[sc.EXCEPTION_TYPE]
        assert isinstance(exception_type, str)
        module, _, name = exception_type.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module or "builtins"), name), Exception)
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)


async def test_three_engines_report_separately_by_pool_name(
    make_engine: EngineFactory, otel: Otel
) -> None:
    sizes = {"primary": 3, "replica": 2, "analytics": 1}
    engines = {
        name: make_engine(name=name, pool_size=size, max_overflow=0) for name, size in sizes.items()
    }
    for engine in engines.values():
        instrument(engine, otel.meter_provider, otel.tracer_provider)
    held = {name: [await e.connect() for _ in range(sizes[name])] for name, e in engines.items()}
    for conn in held["primary"][:1] + held["replica"]:
        await conn.close()

    metrics = otel.collect()
    for name, size in sizes.items():
        assert otel.value(metrics, sc.DB_CLIENT_CONNECTION_MAX, name) == size
        assert otel.value(metrics, sc.DB_CLIENT_CONNECTION_IDLE_MAX, name) == size
        wait_time = otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_WAIT_TIME, name)
        assert wait_time.count == size
    used = {name: otel.value(metrics, COUNT, name, **USED) for name in sizes}
    idle = {name: otel.value(metrics, COUNT, name, **IDLE) for name in sizes}
    assert used == {"primary": 2, "replica": 0, "analytics": 1}
    assert idle == {"primary": 1, "replica": 2, "analytics": 0}
    for conns in held.values():
        for conn in conns:
            await conn.close()


async def test_a_refused_checkout_counts_as_rejected_with_an_error_span(
    make_engine: EngineFactory, otel: Otel, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, max_waiting=1, pool_timeout=10)
    instrument(engine, otel.meter_provider, otel.tracer_provider)
    pool = pool_of(engine)
    first = await engine.connect()
    waiter = asyncio.create_task(hold(engine, 0))
    await wait_until(lambda: pool.waiting == 1, what="one queued checkout")
    with pytest.raises(PoolOverloadedError):
        await engine.connect()
    await first.close()
    await waiter

    metrics = otel.collect()
    assert otel.value(metrics, sc.ASYNCPOOL_CHECKOUT_REJECTED, app_name) == 1
    assert otel.value(metrics, sc.DB_CLIENT_CONNECTION_TIMEOUTS, app_name) == 0
    (rejected,) = [s for s in otel.spans(app_name) if s.status.status_code is StatusCode.ERROR]
    assert rejected.attributes[sc.ERROR_TYPE] == "asyncpool.errors.PoolOverloadedError"
    assert rejected.attributes[sc.ASYNCPOOL_CHECKOUT_QUEUED] is False
    assert otel.open_spans == 0


async def test_failed_connects_are_counted_by_error_type(
    make_engine: EngineFactory, otel: Otel, database: TestDatabase, app_name: str
) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = make_url(database.url).set(port=port)
    engine = make_engine(url.render_as_string(hide_password=False), connect_timeout=2)
    instrument(engine, otel.meter_provider, otel.tracer_provider)
    with pytest.raises(CONNECT_ERROR):
        await engine.connect()

    metrics = otel.collect()
    (point,) = otel.points(metrics, sc.ASYNCPOOL_CONNECTION_ERRORS, app_name)
    assert point.value == 1
    assert point.attributes[sc.ERROR_TYPE] in REFUSED_ERROR_TYPES
    assert otel.points(metrics, sc.DB_CLIENT_CONNECTION_CREATE_TIME, app_name) == []


async def test_invalidations_are_counted_by_reason(
    make_engine: EngineFactory, otel: Otel, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    instrument(engine, otel.meter_provider, otel.tracer_provider)
    async with engine.connect() as conn:
        await conn.invalidate()

    metrics = otel.collect()
    (point,) = otel.points(metrics, sc.ASYNCPOOL_CONNECTION_INVALIDATIONS, app_name)
    assert (point.attributes[sc.ASYNCPOOL_INVALIDATION_REASON], point.value) == ("explicit", 1)


async def test_span_attributes_come_from_the_url_and_never_hold_the_password(
    make_engine: EngineFactory, otel: Otel, database: TestDatabase, app_name: str
) -> None:
    password = "pw-Never-Shown-7731"
    url = make_url(database.url).set(password=password)
    engine = make_engine(url.render_as_string(hide_password=False), pool_size=1, max_overflow=0)
    instrument(engine, otel.meter_provider, otel.tracer_provider, spans="all")
    await hold(engine, 0)

    (span,) = otel.spans(app_name)
    attributes = dict(span.attributes or {})
    assert attributes[sc.DB_SYSTEM_NAME] == "postgresql"
    assert attributes[sc.DB_CLIENT_CONNECTION_POOL_NAME] == app_name
    assert attributes[sc.SERVER_ADDRESS] == url.host
    assert attributes[sc.SERVER_PORT] == url.port
    assert attributes[sc.DB_NAMESPACE] == url.database
    metrics = otel.collect()
    recorded = repr(attributes) + repr(
        [dict(p.attributes) for m in metrics.values() for p in m.data.data_points]
    )
    assert password not in recorded


@pytest.mark.parametrize(
    ("spans", "slow_threshold", "expected"),
    [("off", 0.0, 0), ("slow", 0.0, 1), ("slow", 5.0, 0), ("all", 0.0, 3)],
)
async def test_span_mode_chooses_which_checkouts_get_a_span(
    make_engine: EngineFactory,
    otel: Otel,
    app_name: str,
    spans: str,
    slow_threshold: float,
    expected: int,
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    instrument(
        engine,
        otel.meter_provider,
        otel.tracer_provider,
        spans=spans,  # type: ignore[arg-type]
        slow_threshold=slow_threshold,
    )
    pool = pool_of(engine)
    first = await engine.connect()
    queued = asyncio.create_task(hold(engine, 0))  # waits for ``first``
    await wait_until(lambda: pool.waiting == 1, what="one queued checkout")
    await first.close()
    await queued
    await hold(engine, 0)  # served at once

    assert len(otel.spans(app_name)) == expected
    metrics = otel.collect()
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_WAIT_TIME, app_name).count == 3


async def test_an_engine_is_instrumented_once_and_uninstrument_stops_reporting(
    make_engine: EngineFactory, otel: Otel, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    state = pool_of(engine).state
    (default,) = state.observers  # create_pooled_engine instrumented it already
    assert isinstance(getattr(default, "owner", None), Instrumentation)

    instrument(engine, otel.meter_provider, otel.tracer_provider)
    handle = instrument(engine, otel.meter_provider, otel.tracer_provider)
    assert len(state.observers) == 1
    await hold(engine, 0)
    metrics = otel.collect()
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_WAIT_TIME, app_name).count == 1
    assert otel.value(metrics, COUNT, app_name, **IDLE) == 1

    handle.uninstrument()
    handle.uninstrument()  # idempotent
    assert state.observers == ()
    assert not handle.active
    await hold(engine, 0)
    metrics = otel.collect()
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_WAIT_TIME, app_name).count == 1
    assert otel.points(metrics, COUNT, app_name) == []


async def test_checkouts_recorded_just_before_uninstrument_are_still_reported(
    make_engine: EngineFactory, otel: Otel, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    handle = instrument(engine, otel.meter_provider, otel.tracer_provider)
    for _ in range(3):
        await hold(engine, 0)
    handle.uninstrument()  # before any collection
    metrics = otel.collect()
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_WAIT_TIME, app_name).count == 3
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_USE_TIME, app_name).count == 3


async def test_telemetry_false_leaves_the_pool_without_observers(
    make_engine: EngineFactory, otel: Otel, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, telemetry=False)
    assert pool_of(engine).state.observers == ()
    instrument(engine, otel.meter_provider, otel.tracer_provider)  # still possible later
    await hold(engine, 0)
    metrics = otel.collect()
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_WAIT_TIME, app_name).count == 1


async def test_no_op_providers_attach_nothing_to_the_pool(make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    handle = instrument(engine, NoOpMeterProvider(), NoOpTracerProvider())
    assert not handle.active
    assert pool_of(engine).state.observers == ()
    await hold(engine, 0)


async def test_metrics_survive_engine_dispose(
    make_engine: EngineFactory, otel: Otel, app_name: str
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0)
    instrument(engine, otel.meter_provider, otel.tracer_provider)
    await hold(engine, 0)
    await engine.dispose()  # recreates the pool; the instrumentation follows it
    await hold(engine, 0)

    metrics = otel.collect()
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_WAIT_TIME, app_name).count == 2
    assert otel.value(metrics, COUNT, app_name, **IDLE) == 1
    assert otel.value(metrics, sc.DB_CLIENT_CONNECTION_MAX, app_name) == 2


#: The checkout that holds this ``asyncpool``, for subprocesses.
_ROOT = str(Path(asyncpool.__file__).resolve().parents[1])

_LATE_SDK_SCRIPT = """
import asyncio, json, sys

import asyncpool
from asyncpool.engine import pool_of
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


async def main(url):
    engine = asyncpool.create_pooled_engine(url, name="late", pool_size=1, max_overflow=0)
    state = pool_of(engine).state
    before = [type(o).__name__ for o in state.observers]
    async with engine.connect():
        pass  # nothing can record this one
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(tracer_provider)
    first = await engine.connect()
    queued = asyncio.create_task(engine.connect().start())
    while pool_of(engine).waiting == 0:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.15)  # a slow checkout: past the default span threshold (0.1 s)
    await first.close()
    await (await queued).close()
    found = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(p.attributes.items()))
                    key = m.name + "|" + labels
                    found[key] = getattr(p, "count", getattr(p, "value", None))
    print(json.dumps({
        "before": before,
        "after": [type(o).__name__ for o in state.observers],
        "metrics": found,
        "spans": [s.name for s in spans.get_finished_spans()],
    }))
    await engine.dispose()


asyncio.run(main(sys.argv[1]))
"""


async def test_an_engine_made_before_the_sdk_is_installed_reports_once_it_is(
    database: TestDatabase,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _LATE_SDK_SCRIPT,
        database.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": _ROOT},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["before"] == ["Pending"]
    assert result["after"] == ["PoolTelemetry"]
    pool = f"{sc.DB_CLIENT_CONNECTION_POOL_NAME}=late"
    assert result["metrics"][f"{sc.DB_CLIENT_CONNECTION_WAIT_TIME}|{pool}"] == 2
    assert result["metrics"][f"{sc.DB_CLIENT_CONNECTION_MAX}|{pool}"] == 1
    assert result["metrics"][f"{COUNT}|{pool},{sc.DB_CLIENT_CONNECTION_STATE}=idle"] == 1
    assert result["spans"] == [sc.CHECKOUT_SPAN_NAME]


async def test_an_instrumented_engine_that_is_dropped_is_freed_and_leaves_the_metrics(
    database: TestDatabase, otel: Otel, app_name: str
) -> None:
    engine = asyncpool.create_pooled_engine(database.url, name=app_name, application_name=app_name)
    handle = instrument(engine, otel.meter_provider, otel.tracer_provider)
    await hold(engine, 0)
    await engine.dispose()
    assert otel.points(otel.collect(), COUNT, app_name) != []

    dropped = weakref.ref(engine.sync_engine)
    del engine
    # Tasks of the loop may still hold it for a moment (an async generator's
    # aclose(), a finishing connect): the instruments must not, for good.
    for _ in range(50):
        gc.collect()
        if dropped() is None:
            break
        await asyncio.sleep(0.02)
    assert dropped() is None  # the provider's instruments did not keep it alive
    assert otel.points(otel.collect(), COUNT, app_name) == []
    handle.uninstrument()  # harmless after the engine is gone


async def test_a_connection_being_cleaned_shows_as_cleaning_and_used_until_done(
    make_engine: EngineFactory,
    database: TestDatabase,
    fault_proxy: FaultProxy,
    otel: Otel,
    app_name: str,
) -> None:
    # A statement cancelled while the network is black-holed: the server's
    # acknowledgement never comes, so the cleanup holds its slot until
    # cleanup_timeout aborts the connection.
    engine = make_engine(
        proxied_url(database, fault_proxy), pool_size=1, max_overflow=0, cleanup_timeout=1.0
    )
    instrument(engine, otel.meter_provider, otel.tracer_provider)
    task = asyncio.ensure_future(hold_statement(engine))
    await wait_until(lambda: asyncpool.statistics(engine).checkouts == 1, what="the checkout")
    await asyncio.sleep(0.05)  # the statement is on its way
    fault_proxy.black_hole()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    metrics = otel.collect()
    assert otel.value(metrics, sc.ASYNCPOOL_CONNECTION_CLEANING, app_name) == 1
    assert otel.value(metrics, COUNT, app_name, **USED) == 1
    assert asyncpool.statistics(engine).cleaning == 1
    await wait_until(lambda: asyncpool.statistics(engine).cleaning == 0, what="cleanup_timeout")
    fault_proxy.forward()
    metrics = otel.collect()
    assert otel.value(metrics, sc.ASYNCPOOL_CONNECTION_CLEANING, app_name) == 0
    assert otel.value(metrics, COUNT, app_name, **USED) == 0
    assert asyncpool.statistics(engine).cleanup_timeouts == 1


async def hold_statement(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_sleep(5)"))


async def test_an_engine_dropped_between_collections_still_reports_its_last_histogram_values(
    database: TestDatabase, otel: Otel, app_name: str
) -> None:
    engine = asyncpool.create_pooled_engine(database.url, name=app_name, application_name=app_name)
    instrument(engine, otel.meter_provider, otel.tracer_provider)  # nobody keeps the handle
    for _ in range(100):
        await hold(engine, 0)
    await engine.dispose()
    dropped = weakref.ref(engine.sync_engine)
    del engine
    gc.collect()
    assert dropped() is None
    metrics = otel.collect()
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_WAIT_TIME, app_name).count == 100
    assert otel.histogram(metrics, sc.DB_CLIENT_CONNECTION_USE_TIME, app_name).count == 100
    assert await database.backends(app_name) == []  # disposed: nothing left on the server


async def test_the_maintenance_reports_what_it_did_by_action(
    make_engine: EngineFactory, otel: Otel, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=1, idle_timeout=0.5)
    instrument(engine, otel.meter_provider, otel.tracer_provider)
    held = [await engine.connect() for _ in range(2)]
    for conn in held:
        await conn.execute(text("SELECT 1"))
        await conn.close()
    await wait_until(lambda: asyncpool.statistics(engine).idle_closes == 1, what="an idle close")
    metrics = otel.collect()
    action = sc.ASYNCPOOL_MAINTENANCE_ACTION
    assert (
        otel.value(metrics, sc.ASYNCPOOL_CONNECTION_MAINTENANCE, app_name, **{action: "idle_close"})
        == 1
    )
    assert (
        otel.value(metrics, sc.ASYNCPOOL_CONNECTION_MAINTENANCE, app_name, **{action: "refill"})
        == 0
    )
