"""health_endpoint as a readiness probe that never queues (issue 15).

A saturated pool on a healthy database answers at once with "saturated";
a database that refuses or never answers is "unavailable" within the
timeout; the probe's own connection is closed afterwards and never touches
the pool; no password ever reaches the body. Requests go through the ASGI
interface (httpx's ``ASGITransport``), the faults through the TCP proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import Route

from asyncpool import statistics
from asyncpool.embedded import free_port
from asyncpool.starlette import health_endpoint
from tests.fix_db import EngineFactory, TestDatabase, wait_for_async, wait_until
from tests.fix_proxy import FaultProxy, proxied_url

#: Slack on top of the endpoint's timeout for the request itself.
MARGIN = 0.5


async def get_health(app: Starlette) -> tuple[int, dict[str, Any], float]:
    """One ``GET /health``: status, JSON body, seconds it took."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        started = time.perf_counter()
        response = await client.get("/health")
        elapsed = time.perf_counter() - started
    return response.status_code, response.json(), elapsed


def health_app(*engines: AsyncEngine, **options: Any) -> Starlette:
    return Starlette(routes=[Route("/health", health_endpoint(*engines, **options))])


@asynccontextmanager
async def held(engine: AsyncEngine, count: int) -> AsyncIterator[list[asyncio.Task[None]]]:
    """``count`` tasks each holding a checked-out connection until the block ends."""
    release = asyncio.Event()
    checked_out = 0

    async def hold() -> None:
        nonlocal checked_out
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
            checked_out += 1
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(count)]
    try:
        await wait_until(lambda: checked_out == count, what=f"{count} connections held")
        yield tasks
    finally:
        release.set()
        await asyncio.gather(*tasks)


async def test_saturated_pool_on_a_healthy_database_answers_at_once(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0, pool_timeout=30)
    # A timeout the old pooled check would have waited out in the queue.
    app = health_app(engine, timeout=5.0)
    async with held(engine, 2):
        status, body, elapsed = await get_health(app)
        assert (status, body["status"]) == (200, "saturated")
        assert elapsed < 0.1, elapsed
        pool = body["pools"][statistics(engine).name]
        assert (pool["state"], pool["checked_out"], pool["max_size"]) == ("saturated", 2, 2)
        assert "saturated: 2 checked out of 2, 0 waiting" in body["reason"]

        waiters = [asyncio.create_task(_checkout_once(engine)) for _ in range(3)]
        await wait_until(lambda: statistics(engine).waiting == 3, what="3 callers queued")
        status, body, elapsed = await get_health(app)
        assert (status, body["status"]) == (200, "saturated")
        assert elapsed < 0.1, elapsed
        assert "2 checked out of 2, 3 waiting" in body["reason"]
        assert statistics(engine).waiting == 3  # the probe did not join the queue
    await asyncio.gather(*waiters)
    status, body, _ = await get_health(app)
    assert (status, body["status"]) == (200, "ok")
    assert "reason" not in body


async def _checkout_once(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SELECT 1")


async def test_saturated_status_is_configurable(make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    async with held(engine, 1):
        status, body, _ = await get_health(health_app(engine, saturated_status=503))
    assert (status, body["status"]) == (503, "saturated")


async def test_refusing_database_is_unavailable_within_the_timeout(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy
) -> None:
    engine = make_engine(proxied_url(database, fault_proxy), pool_size=1)
    app = health_app(engine, timeout=1.0)
    assert (await get_health(app))[0] == 200
    fault_proxy.reset(refuse=True)
    status, body, elapsed = await get_health(app)
    assert (status, body["status"]) == (503, "unavailable")
    assert body["pools"][statistics(engine).name]["state"] == "unavailable"
    assert "database unavailable: " in body["reason"]
    assert "no answer" not in body["reason"]  # refused, not timed out
    assert elapsed <= 1.0 + MARGIN, elapsed


async def test_black_holed_database_is_unavailable_when_the_timeout_ends(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy
) -> None:
    engine = make_engine(proxied_url(database, fault_proxy), pool_size=1, connect_timeout=30)
    app = health_app(engine, timeout=1.0)
    fault_proxy.black_hole()
    status, body, elapsed = await get_health(app)
    assert (status, body["status"]) == (503, "unavailable")
    assert "database unavailable: no answer within 1 s" in body["reason"]
    assert 1.0 <= elapsed <= 1.0 + MARGIN, elapsed


async def test_unavailable_wins_over_saturated(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy
) -> None:
    engine = make_engine(proxied_url(database, fault_proxy), pool_size=1, max_overflow=0)
    async with held(engine, 1):
        fault_proxy.black_hole()
        status, body, _ = await get_health(health_app(engine, timeout=0.5))
        fault_proxy.forward()
    assert (status, body["status"]) == (503, "unavailable")


@pytest.mark.asyncpg_only  # psycopg: reads asyncpg's connect arguments (server_settings)
async def test_probe_connection_is_closed_and_never_touches_the_pool(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=2)
    connects: list[dict[str, Any]] = []

    @event.listens_for(engine.sync_engine, "do_connect")
    def seen(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        connects.append(dict(cparams))

    async with engine.connect() as conn:  # one pooled backend, idle afterwards
        await conn.exec_driver_sql("SELECT 1")
    before = statistics(engine)
    app = health_app(engine)
    for _ in range(3):
        status, body, _ = await get_health(app)
        assert (status, body["status"]) == (200, "ok")
    assert statistics(engine) == before
    # Opened like a pooled connection: the engine's connect arguments applied.
    assert len(connects) == 4
    assert all(c["server_settings"]["application_name"] == app_name for c in connects)

    async def only_the_pooled_backend_left() -> bool:
        return len(await database.backends(app_name)) == 1

    await wait_for_async(only_the_pooled_backend_left, what="the probe backends to exit")


async def test_concurrent_requests_share_one_probe_connection(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy
) -> None:
    engine = make_engine(proxied_url(database, fault_proxy), pool_size=1, connect_timeout=30)
    connects = 0

    @event.listens_for(engine.sync_engine, "do_connect")
    def seen(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        nonlocal connects
        connects += 1

    app = health_app(engine, timeout=1.0)
    # Black-holed, the first probe stays under way for the whole timeout.
    fault_proxy.black_hole()
    answers = await asyncio.gather(*(get_health(app) for _ in range(20)))
    assert {(status, body["status"]) for status, body, _ in answers} == {(503, "unavailable")}
    assert max(elapsed for _, _, elapsed in answers) <= 1.0 + MARGIN
    assert connects == 1
    fault_proxy.forward()
    status, _, _ = await get_health(app)  # a new probe once the last one ended
    assert status == 200
    assert connects == 2


@pytest.mark.parametrize("fault", ["closed port", "refused by the proxy"])
async def test_password_never_reaches_the_body(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy, fault: str
) -> None:
    password = "hunter2:s3cret/pw"
    port = free_port() if fault == "closed port" else fault_proxy.port
    fault_proxy.reset(refuse=True)
    url = f"postgresql+asyncpg://app:{quote(password, safe='')}@127.0.0.1:{port}/x"
    engine = make_engine(url, name="secret")
    status, body, _ = await get_health(health_app(engine, timeout=1.0))
    assert status == 503
    text = str(body)
    assert body["reason"].startswith("pool 'secret': database unavailable: ")
    for secret in (password, quote(password, safe=""), "s3cret"):
        assert secret not in text
