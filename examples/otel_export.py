"""Export asyncpool's pool metrics and checkout spans to an OTLP collector.

The official exporters (``opentelemetry-exporter-otlp``) are configured the
standard way, from the environment:

* ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default ``http://localhost:4317``; the
  per-signal ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` / ``..._TRACES_...`` too),
  ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_INSECURE``, ...;
* ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc`` (default here) or ``http/protobuf``;
* ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``;
* ``OTEL_METRIC_EXPORT_INTERVAL`` (ms between metric exports, default 60000).

The only asyncpool-specific step is none at all: the SDK is installed as the
global provider, and every engine made by ``create_pooled_engine`` reports
through it (engines made *before* the SDK was installed start reporting then).

It runs a short burst on a pool of 2 so that checkouts queue (checkout spans
inside the ``burst`` span, ``pending_requests`` above zero) and makes one
checkout time out on a second pool (an error span, ``timeouts`` = 1)::

    docker run -p 4317:4317 otel/opentelemetry-collector   # or any OTLP backend
    python examples/otel_export.py                   # embedded PostgreSQL
    DATABASE_URL=postgresql://... python examples/otel_export.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncpool
from asyncpool.embedded import database_url

# Each hold is longer than the default span threshold (0.1 s), so every
# checkout that queues behind one gets a checkout span.
TASKS, HOLD = 12, 0.15


def setup_opentelemetry() -> tuple[MeterProvider, TracerProvider]:
    """Install the SDK globally with OTLP exporters configured from the environment."""
    if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())],
    )
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    metrics.set_meter_provider(meter_provider)
    trace.set_tracer_provider(tracer_provider)
    return meter_provider, tracer_provider


async def burst(engine: AsyncEngine) -> None:
    """``TASKS`` tasks on a pool of 2, each holding its connection for ``HOLD`` s."""

    async def one() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": HOLD})

    with trace.get_tracer("otel_export example").start_as_current_span("burst"):
        await asyncio.gather(*(one() for _ in range(TASKS)))


async def time_out_once(engine: AsyncEngine) -> None:
    """Hold the only connection of ``engine`` and ask for another: a timeout."""
    async with engine.connect():
        with (
            trace.get_tracer("otel_export example").start_as_current_span("starved"),
            contextlib.suppress(asyncpool.PoolTimeoutError),
        ):
            await engine.connect()


async def main(url: str) -> None:
    url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    meter_provider, tracer_provider = setup_opentelemetry()
    engine = asyncpool.create_pooled_engine(url, name="example", pool_size=2, max_overflow=0)
    tight = asyncpool.create_pooled_engine(
        url, name="example-tight", pool_size=1, max_overflow=0, pool_timeout=0.2
    )
    try:
        await burst(engine)
        await time_out_once(tight)
        # Export while the pools still hold their idle connections.
        meter_provider.force_flush()
        print("exported:", asyncpool.statistics(engine), asyncpool.statistics(tight), sep="\n")
    finally:
        await engine.dispose()
        await tight.dispose()
        tracer_provider.shutdown()
        meter_provider.shutdown()


if __name__ == "__main__":
    with database_url() as url:
        asyncio.run(main(url))
    sys.exit(0)
