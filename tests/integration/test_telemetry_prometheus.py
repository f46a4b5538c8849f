"""The Prometheus ``/metrics`` view, scraped over HTTP and parsed with prometheus_client."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url
from starlette.applications import Starlette

import asyncpool
from asyncpool import PoolTimeoutError
from asyncpool.telemetry import instrument
from asyncpool.telemetry.prometheus import MetricsApp, create_metric_reader, metrics_route
from tests.fix_db import CONNECT_ERROR, REFUSED_ERROR_TYPES, EngineFactory, TestDatabase, wait_until

_DASHBOARD = Path(asyncpool.__file__).resolve().parents[1] / "examples" / "grafana_dashboard.json"

POOL_LABEL = "db_client_connection_pool_name"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def meter_provider(registry: CollectorRegistry) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[create_metric_reader(registry)])
    yield provider
    provider.shutdown()


@pytest.fixture
async def server(registry: CollectorRegistry) -> AsyncIterator[str]:
    """A real HTTP server (uvicorn, loopback, a free port) serving a Starlette app with the view."""
    app = Starlette(routes=[metrics_route(registry=registry)])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        uv = uvicorn.Server(config)
        task = asyncio.create_task(uv.serve(sockets=[sock]))
        try:
            await wait_until(lambda: uv.started, what="uvicorn to listen")
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            uv.should_exit = True
            await task


def samples(body: str) -> dict[str, list[Any]]:
    """Sample name -> samples, from the exposition text."""
    found: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def value(found: dict[str, list[Any]], name: str, pool: str, **labels: str) -> float:
    (sample,) = [
        s
        for s in found[name]
        if s.labels.get(POOL_LABEL) == pool and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return float(sample.value)


async def exercise(make_engine: EngineFactory, database: TestDatabase, meter_provider: Any) -> str:
    """One pool through every kind of event; returns its name."""
    engine = make_engine(pool_size=2, max_overflow=0, pool_timeout=0.2)
    instrument(engine, meter_provider)
    first, second = await engine.connect(), await engine.connect()
    with pytest.raises(PoolTimeoutError):
        await engine.connect()
    await second.execute(text("SELECT 1"))
    await second.invalidate()
    await second.close()
    await first.close()
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    broken = make_engine(
        make_url(database.url).set(port=port).render_as_string(hide_password=False),
        name="broken",
    )
    instrument(broken, meter_provider)
    with pytest.raises(CONNECT_ERROR):
        await broken.connect()
    return str(asyncpool.statistics(engine).name)


async def test_a_real_http_scrape_parses_and_shows_the_pool(
    make_engine: EngineFactory, database: TestDatabase, meter_provider: Any, server: str
) -> None:
    pool = await exercise(make_engine, database, meter_provider)
    async with httpx.AsyncClient(base_url=server) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)

    assert value(found, "db_client_connection_max", pool) == 2
    assert value(found, "db_client_connection_idle_max", pool) == 2
    assert value(found, "db_client_connection_count", pool, db_client_connection_state="used") == 0
    assert value(found, "db_client_connection_count", pool, db_client_connection_state="idle") == 1
    assert value(found, "db_client_connection_pending_requests", pool) == 0
    assert value(found, "db_client_connection_timeouts_total", pool) == 1
    assert value(found, "asyncpool_checkout_rejected_total", pool) == 0
    assert value(found, "asyncpool_pre_ping_failures_total", pool) == 0
    assert value(found, "db_client_connection_wait_time_seconds_count", pool) == 2
    assert value(found, "db_client_connection_use_time_seconds_count", pool) == 2
    assert value(found, "db_client_connection_create_time_seconds_count", pool) == 2
    assert value(found, "db_client_connection_wait_time_seconds_bucket", pool, le="+Inf") == 2
    assert (
        value(
            found,
            "asyncpool_connection_invalidations_total",
            pool,
            asyncpool_invalidation_reason="explicit",
        )
        == 1
    )
    (error,) = found["asyncpool_connection_errors_total"]
    assert error.labels[POOL_LABEL] == "broken" and error.value == 1
    assert error.labels["error_type"] in REFUSED_ERROR_TYPES


async def test_the_view_speaks_openmetrics_when_asked_and_refuses_other_methods(
    registry: CollectorRegistry, meter_provider: Any, make_engine: EngineFactory
) -> None:
    instrument(make_engine(), meter_provider)
    transport = httpx.ASGITransport(app=MetricsApp(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        openmetrics = await client.get(
            "/", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
        post = await client.post("/")
        head = await client.head("/")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")
    assert "db_client_connection_max" in openmetrics.text
    assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")
    assert (head.status_code, head.content) == (200, b"")


async def test_the_grafana_dashboard_uses_only_metrics_and_labels_the_view_serves(
    make_engine: EngineFactory, database: TestDatabase, meter_provider: Any, registry: Any
) -> None:
    await exercise(make_engine, database, meter_provider)
    transport = httpx.ASGITransport(app=Starlette(routes=[metrics_route(registry=registry)]))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        found = samples((await client.get("/metrics")).text)
    served_labels = {label for group in found.values() for s in group for label in s.labels}

    dashboard = json.loads(_DASHBOARD.read_text())
    exprs = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ] + [
        variable["definition"]
        for variable in dashboard["templating"]["list"]
        if "definition" in variable
    ]
    assert exprs
    used_metrics = {
        name for expr in exprs for name in re.findall(r"\b(?:db_client|asyncpool)_\w+", expr)
    }
    grouped = [
        label.strip()
        for expr in exprs
        for clause in re.findall(r"by \(([^)]*)\)", expr)
        for label in clause.split(",")
    ]
    matched = [label for expr in exprs for label in re.findall(r"([a-z_]+)=~?\"", expr)]
    legends = [
        label
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for label in re.findall(r"\{\{(\w+)\}\}", target["legendFormat"])
    ]
    variables = [
        label for expr in exprs for label in re.findall(r"label_values\(\w+, (\w+)\)", expr)
    ]
    used_labels = set(grouped + matched + legends + variables) - {"le"}
    used_metrics -= used_labels  # label names look like metric names
    assert used_metrics and used_labels
    assert used_metrics <= set(found), used_metrics - set(found)
    assert used_labels <= served_labels, used_labels - served_labels
    required = {
        "db_client_connection_count",  # utilisation
        "db_client_connection_pending_requests",  # waiting
        "db_client_connection_wait_time_seconds_bucket",  # wait p50/p99
        "db_client_connection_timeouts_total",
        "asyncpool_pre_ping_failures_total",
    }
    assert required <= used_metrics
    assert "$pool" in json.dumps(dashboard)
