"""OTLP export: the official exporters, pointed at real OTLP receivers on loopback, over
both transports: gRPC and HTTP with binary protobuf (``http/protobuf``)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc import metric_exporter as grpc_metrics
from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_traces
from opentelemetry.exporter.otlp.proto.http import metric_exporter as http_metrics
from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_traces
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from sqlalchemy import text

import asyncpool
from asyncpool import PoolTimeoutError
from asyncpool.engine import pool_of
from asyncpool.telemetry import instrument
from asyncpool.telemetry import semconv as sc
from tests.fix_db import EngineFactory, TestDatabase, wait_until
from tests.fix_otlp import OtlpReceiver, any_value, attributes_of

_ROOT = Path(asyncpool.__file__).resolve().parents[1]
_EXAMPLE = _ROOT / "examples" / "otel_export.py"

#: (name, unit, OTLP data kind, monotonic) for every convention metric.
_CONVENTION: dict[str, tuple[str, str, bool | None]] = {
    sc.DB_CLIENT_CONNECTION_COUNT: ("{connection}", "sum", False),
    sc.DB_CLIENT_CONNECTION_IDLE_MAX: ("{connection}", "sum", False),
    sc.DB_CLIENT_CONNECTION_IDLE_MIN: ("{connection}", "sum", False),
    sc.DB_CLIENT_CONNECTION_MAX: ("{connection}", "sum", False),
    sc.DB_CLIENT_CONNECTION_PENDING_REQUESTS: ("{request}", "sum", False),
    sc.DB_CLIENT_CONNECTION_TIMEOUTS: ("{timeout}", "sum", True),
    sc.DB_CLIENT_CONNECTION_CREATE_TIME: ("s", "histogram", None),
    sc.DB_CLIENT_CONNECTION_WAIT_TIME: ("s", "histogram", None),
    sc.DB_CLIENT_CONNECTION_USE_TIME: ("s", "histogram", None),
}


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> OtlpReceiver:
    """A real OTLP receiver for each protocol the exporters speak."""
    fixture = {"grpc": "otlp_receiver", "http/protobuf": "otlp_http_receiver"}[request.param]
    found: OtlpReceiver = request.getfixturevalue(fixture)
    return found


def exporters(receiver: OtlpReceiver) -> tuple[MetricExporter, SpanExporter]:
    """The official exporters for the receiver's protocol, pointed at it."""
    if receiver.protocol == "grpc":
        return (
            grpc_metrics.OTLPMetricExporter(endpoint=receiver.endpoint, insecure=True),
            grpc_traces.OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True),
        )
    # Over HTTP an endpoint given in code is the full URL of the signal.
    return (
        http_metrics.OTLPMetricExporter(endpoint=f"{receiver.endpoint}/v1/metrics"),
        http_traces.OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"),
    )


def latest(receiver: OtlpReceiver) -> dict[str, Any]:
    """The last received version of each metric, by name."""
    return {metric.name: metric for metric in receiver.metrics()}


def point_values(metric: Any, pool: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    """Data points of ``pool``: other attributes -> value (sums) or the point (histograms)."""
    kind = metric.WhichOneof("data")
    out: dict[tuple[tuple[str, Any], ...], Any] = {}
    for point in getattr(metric, kind).data_points:
        attributes = attributes_of(point)
        if attributes.pop(sc.DB_CLIENT_CONNECTION_POOL_NAME, None) != pool:
            continue
        key = tuple(sorted(attributes.items()))
        if kind == "histogram":
            out[key] = point
        else:
            out[key] = point.as_int if point.HasField("as_int") else point.as_double
    return out


async def test_the_otlp_exporter_delivers_every_pool_metric_and_a_checkout_span(
    make_engine: EngineFactory, receiver: OtlpReceiver, app_name: str
) -> None:
    metric_exporter, span_exporter = exporters(receiver)
    meter_provider = MeterProvider(
        metric_readers=[
            PeriodicExportingMetricReader(
                metric_exporter,
                export_interval_millis=3_600_000,  # exports on flush only
            )
        ]
    )
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    try:
        engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=0.3)
        instrument(engine, meter_provider, tracer_provider, slow_threshold=0.0)
        pool = pool_of(engine)
        first = await engine.connect()

        async def queued() -> None:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

        task = asyncio.create_task(queued())
        await wait_until(lambda: pool.waiting == 1, what="one queued checkout")
        await first.close()
        await task
        async with engine.connect():
            with pytest.raises(PoolTimeoutError):
                await engine.connect()
        assert meter_provider.force_flush(10_000)
    finally:
        meter_provider.shutdown()
        tracer_provider.shutdown()

    assert receiver.refused == []
    metrics = latest(receiver)
    for name, (unit, kind, monotonic) in _CONVENTION.items():
        metric = metrics[name]
        assert (metric.unit, metric.WhichOneof("data")) == (unit, kind), name
        if monotonic is not None:
            assert metric.sum.is_monotonic is monotonic, name

    def value(name: str, **attributes: str) -> Any:
        key = tuple(sorted((k.replace("__", "."), v) for k, v in attributes.items()))
        return point_values(metrics[name], app_name)[key]

    assert value(sc.DB_CLIENT_CONNECTION_COUNT, db__client__connection__state="used") == 0
    assert value(sc.DB_CLIENT_CONNECTION_COUNT, db__client__connection__state="idle") == 1
    assert value(sc.DB_CLIENT_CONNECTION_MAX) == 1
    assert value(sc.DB_CLIENT_CONNECTION_IDLE_MAX) == 1
    assert value(sc.DB_CLIENT_CONNECTION_IDLE_MIN) == 1
    assert value(sc.DB_CLIENT_CONNECTION_PENDING_REQUESTS) == 0
    assert value(sc.DB_CLIENT_CONNECTION_TIMEOUTS) == 1
    assert value(sc.DB_CLIENT_CONNECTION_CREATE_TIME).count == 1
    assert value(sc.DB_CLIENT_CONNECTION_WAIT_TIME).count == 3
    assert value(sc.DB_CLIENT_CONNECTION_USE_TIME).count == 3
    assert value(sc.DB_CLIENT_CONNECTION_WAIT_TIME).max > 0

    spans = [s for s in receiver.spans() if s.name == sc.CHECKOUT_SPAN_NAME]
    assert len(spans) == 2
    waited, timed_out = sorted(spans, key=lambda s: s.status.code)
    assert waited.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    assert timed_out.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    attributes = attributes_of(waited)
    assert attributes[sc.DB_CLIENT_CONNECTION_POOL_NAME] == app_name
    assert attributes[sc.DB_SYSTEM_NAME] == "postgresql"
    assert attributes[sc.ASYNCPOOL_CHECKOUT_QUEUED] is True
    assert attributes[sc.ASYNCPOOL_CHECKOUT_WAIT] > 0
    assert attributes_of(timed_out)[sc.ERROR_TYPE] == "asyncpool.errors.PoolTimeoutError"


async def test_the_example_exports_over_otlp_configured_by_the_standard_variables(
    database: TestDatabase, receiver: OtlpReceiver
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(_ROOT),
        "DATABASE_URL": database.url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,  # over HTTP: + /v1/metrics, /v1/traces
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_EXPORTER_OTLP_PROTOCOL": receiver.protocol,
        "OTEL_SERVICE_NAME": "asyncpool-example-test",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(_EXAMPLE),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()

    assert receiver.refused == []
    (resource, *_) = [rm.resource for r in receiver.metric_requests for rm in r.resource_metrics]
    assert attributes_of(resource)["service.name"] == "asyncpool-example-test"
    metrics = latest(receiver)
    assert set(_CONVENTION) <= set(metrics)
    wait_time = point_values(metrics[sc.DB_CLIENT_CONNECTION_WAIT_TIME], "example")[()]
    assert wait_time.count == 12  # TASKS in the example
    assert point_values(metrics[sc.DB_CLIENT_CONNECTION_MAX], "example")[()] == 2
    assert point_values(metrics[sc.DB_CLIENT_CONNECTION_TIMEOUTS], "example-tight")[()] == 1

    spans = receiver.spans()
    by_name: dict[str, list[Any]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    (burst,) = by_name["burst"]
    (starved,) = by_name["starved"]
    checkouts = by_name[sc.CHECKOUT_SPAN_NAME]
    in_burst = [s for s in checkouts if s.parent_span_id == burst.span_id]
    assert len(in_burst) == 10  # 12 tasks, 2 connections: 10 queued
    assert all(s.trace_id == burst.trace_id for s in in_burst)
    (error,) = [s for s in checkouts if s.parent_span_id == starved.span_id]
    assert error.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    pools = {
        any_value(kv.value)
        for s in checkouts
        for kv in s.attributes
        if kv.key == sc.DB_CLIENT_CONNECTION_POOL_NAME
    }
    assert pools == {"example", "example-tight"}


def test_the_http_receiver_takes_only_otlp_protobuf_on_the_signal_paths(
    otlp_http_receiver: OtlpReceiver,
) -> None:
    """So a test passing over http/protobuf means the exporter spoke it, not something close."""
    import urllib.error
    import urllib.request

    def post(path: str, content_type: str, body: bytes) -> int:
        request = urllib.request.Request(
            otlp_http_receiver.endpoint + path,
            data=body,
            headers={"Content-Type": content_type},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post("/v1/metrics", "application/json", b"{}") == 415
    assert post("/v1/logs", "application/x-protobuf", b"") == 404
    assert post("/v1/traces", "application/x-protobuf", b"\xff\xff") == 400
    assert post("/v1/metrics", "application/x-protobuf", b"") == 200  # an empty request
    assert [status for *_, status in otlp_http_receiver.refused] == [415, 404, 400]
    assert len(otlp_http_receiver.metric_requests) == 1
