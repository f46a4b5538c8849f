"""asyncpool.starlette: lifespan, request sessions and health, in Starlette and FastAPI.

Requests go through real ASGI stacks: a uvicorn server in the test's own
event loop (real HTTP, real client disconnects), or the ASGI app called
directly where a test needs to cancel the request task itself.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI, HTTPException
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from asyncpool import (
    EngineGroup,
    PoolConfig,
    create_analytics_engine,
    pool_lifespan,
    statistics,
)
from asyncpool.embedded import free_port
from asyncpool.starlette import STATE_KEY, Sessions, create_lifespan, health_endpoint
from tests.fix_db import EngineFactory, TestDatabase, wait_for_async, wait_until


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn in this event loop; yield its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="error")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or task.done(), what="uvicorn to start", within=10)
    if task.done():
        await task
        raise AssertionError("uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def asgi_get(app: Any, path: str) -> tuple[int, bytes]:
    """One GET through the ASGI interface, no server and no lifespan."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        response = await client.get(path)
        return response.status_code, response.content


@pytest.fixture
async def table(database: TestDatabase, app_name: str) -> AsyncIterator[str]:
    name = "items_" + app_name.replace("-", "_")
    await database.fetch(
        f"CREATE TABLE {name} (id serial PRIMARY KEY,"
        " name text UNIQUE DEFERRABLE INITIALLY DEFERRED)"
    )
    yield name
    await database.fetch(f"DROP TABLE {name}")


def fastapi_app(engine: AsyncEngine, table: str, seen: dict[str, Any]) -> FastAPI:
    sessions = Sessions(engine)
    # `from __future__ import annotations` hides a local Annotated alias from
    # FastAPI, so the dependency goes in the default here.
    db = sessions.depends()

    app = FastAPI()

    @app.post("/items/{name}")
    async def add(name: str, session: AsyncSession = db) -> dict[str, int]:
        new_id = await session.scalar(
            text(f"INSERT INTO {table} (name) VALUES (:n) RETURNING id"), {"n": name}
        )
        return {"id": int(new_id or 0)}

    @app.post("/items/{name}/conflict")
    async def add_then_fail(name: str, session: AsyncSession = db) -> None:
        await session.execute(text(f"INSERT INTO {table} (name) VALUES (:n)"), {"n": name})
        raise HTTPException(status_code=409, detail="refused after the insert")

    @app.get("/no-query")
    async def no_query(session: AsyncSession = db) -> dict[str, bool]:
        return {"ok": session is not None}

    @app.get("/export")
    async def export(session: AsyncSession = db) -> StreamingResponse:
        names = list(await session.scalars(text(f"SELECT name FROM {table} ORDER BY id")))

        async def lines() -> AsyncIterator[str]:
            seen["checked_out_while_streaming"] = statistics(engine).checked_out
            for name in names:
                yield name + "\n"

        return StreamingResponse(lines(), media_type="text/plain")

    @app.get("/sleep")
    async def sleep(session: AsyncSession = db) -> None:
        seen["sleeping"].set()
        await session.execute(text("SELECT pg_sleep(30)"))

    return app


async def names_in(database: TestDatabase, table: str) -> list[str]:
    return [r["name"] for r in await database.fetch(f"SELECT name FROM {table} ORDER BY id")]


async def test_fastapi_dependency_commits_on_success_and_rolls_back_on_error(
    make_engine: EngineFactory, database: TestDatabase, table: str
) -> None:
    engine = make_engine(pool_size=2)
    app = fastapi_app(engine, table, {})
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.post("/items/kept")).status_code == 200
        assert (await client.post("/items/dropped/conflict")).status_code == 409
        # The unique check is deferred to COMMIT: a failed commit is an error response.
        assert (await client.post("/items/kept")).status_code == 500
    assert await names_in(database, table) == ["kept"]
    assert statistics(engine).checked_out == 0


async def test_session_checks_out_at_the_first_query_only(
    make_engine: EngineFactory, table: str
) -> None:
    engine = make_engine(pool_size=1)
    app = fastapi_app(engine, table, {})
    status, _ = await asgi_get(app, "/no-query")
    assert status == 200
    assert statistics(engine).checkouts == 0


async def test_connection_is_released_before_a_streaming_response_starts(
    make_engine: EngineFactory, database: TestDatabase, table: str
) -> None:
    engine = make_engine(pool_size=1)
    await database.fetch(f"INSERT INTO {table} (name) VALUES ('ada'), ('grace')")
    seen: dict[str, Any] = {}
    status, body = await asgi_get(fastapi_app(engine, table, seen), "/export")
    assert (status, body) == (200, b"ada\ngrace\n")
    assert statistics(engine).checkouts == 1
    assert seen["checked_out_while_streaming"] == 0


async def test_session_refuses_use_after_its_early_release(make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=1)
    sessions = Sessions(engine)
    async with sessions.scope() as session:
        await session.execute(text("SELECT 1"))
    with pytest.raises(Exception, match="permanently closed"):
        await session.execute(text("SELECT 1"))
    assert statistics(engine).checked_out == 0


async def query_running(database: TestDatabase, app_name: str) -> bool:
    running = await database.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        " AND state = 'active' AND query LIKE '%pg_sleep(30)%'",
        app_name,
    )
    return bool(running)


async def test_cancelled_request_gives_its_connection_back(
    make_engine: EngineFactory, database: TestDatabase, app_name: str, table: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    seen: dict[str, Any] = {}
    app = fastapi_app(engine, table, seen)
    seen["sleeping"] = asyncio.Event()
    task = asyncio.create_task(asgi_get(app, "/sleep"))
    await wait_for_async(lambda: query_running(database, app_name), what="pg_sleep to run")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The pool cancels the statement on the server before the slot comes back.
    await wait_until(lambda: statistics(engine).checked_out == 0, what="the cleanup")
    assert not await query_running(database, app_name)
    async with engine.connect() as conn:  # the only slot is free again
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert statistics(engine).connects == 1  # the same connection, cleaned and reused


async def test_request_cancelled_by_an_anyio_cancel_scope_gives_its_connection_back(
    make_engine: EngineFactory, database: TestDatabase, app_name: str, table: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    seen: dict[str, Any] = {"sleeping": asyncio.Event()}
    app = fastapi_app(engine, table, seen)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(asgi_get, app, "/sleep")
            await wait_for_async(lambda: query_running(database, app_name), what="pg_sleep to run")
            scope.cancel()
    assert scope.cancelled_caught
    await wait_until(lambda: statistics(engine).checked_out == 0, what="the cleanup")
    assert not await query_running(database, app_name)


async def no_active_backend(database: TestDatabase, app_name: str) -> bool:
    states = [r["state"] for r in await database.backends(app_name)]
    return all(state == "idle" for state in states)


async def test_client_disconnecting_mid_stream_leaves_no_connection_checked_out(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    """A stream that queries while it streams: one short scope per chunk."""
    engine = make_engine(pool_size=2, max_overflow=0)
    sessions = Sessions(engine)
    chunks_sent = asyncio.Event()

    async def ticks(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for n in range(1000):
                async with sessions.scope() as session:
                    await session.execute(text("SELECT pg_sleep(0.02)"))
                    value = await session.scalar(text("SELECT CAST(:n AS int)"), {"n": n})
                if n == 2:
                    chunks_sent.set()
                yield f"{value}\n".encode()

        return StreamingResponse(body())

    app = Starlette(routes=[Route("/ticks", ticks)])
    async with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"GET /ticks HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(chunks_sent.wait(), 10)
        await wait_until(
            lambda: statistics(engine).checked_out == 0, what="the stream's connection back"
        )
        await wait_for_async(
            lambda: no_active_backend(database, app_name), what="no busy backend", within=5
        )
        assert statistics(engine).checkouts < 1000


async def test_lifespan_warms_wraps_the_user_lifespan_and_shares_state(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=3)
    events: list[str] = []

    @asynccontextmanager
    async def user_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        events.append(f"user start, idle={statistics(engine).idle}")
        yield {"greeting": "hello"}
        events.append(f"user stop, closed={engine.sync_engine.pool.state.closed}")  # type: ignore[attr-defined]

    async def state(request: Request) -> JSONResponse:
        engines = getattr(request.state, STATE_KEY)
        return JSONResponse({"greeting": request.state.greeting, "engines": list(engines)})

    app = Starlette(
        routes=[Route("/state", state), Route("/health", health_endpoint())],
        lifespan=create_lifespan(engine, lifespan=user_lifespan),
    )
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        got = (await client.get("/state")).json()
        assert got == {"greeting": "hello", "engines": [app_name]}
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        assert health.json()["pools"][app_name]["idle"] == 3
    assert events == ["user start, idle=3", "user stop, closed=False"]
    assert statistics(engine).size == 0


async def test_health_is_503_with_a_reason_while_the_database_does_not_answer(
    make_engine: EngineFactory,
) -> None:
    up = make_engine(name="up", pool_size=1)
    down = make_engine(
        f"postgresql+asyncpg://app:hunter2-pw@127.0.0.1:{free_port()}/x", name="down"
    )
    app = Starlette(routes=[Route("/health", health_endpoint(up, down, timeout=1.0))])
    status, body = await asgi_get(app, "/health")
    assert status == 503
    payload = httpx.Response(status, content=body).json()
    assert payload["status"] == "unavailable"
    assert payload["reason"].startswith("pool 'down': ")
    assert "'up'" not in payload["reason"]
    assert "hunter2-pw" not in body.decode()
    assert set(payload["pools"]) == {"up", "down"}


async def test_health_is_503_while_the_pool_drains(make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=1)
    app = Starlette(routes=[Route("/health", health_endpoint(engine))])
    async with pool_lifespan(engine):
        assert (await asgi_get(app, "/health"))[0] == 200
    status, body = await asgi_get(app, "/health")
    assert status == 503
    assert b"shutting down" in body


async def test_plain_starlette_helper_commits_and_rolls_back(
    make_engine: EngineFactory, database: TestDatabase, table: str
) -> None:
    engine = make_engine(pool_size=1)
    sessions = Sessions(engine)

    async def add(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        async with sessions.scope() as session:
            await session.execute(text(f"INSERT INTO {table} (name) VALUES (:n)"), {"n": name})
        return JSONResponse({"added": name})

    async def add_or_raise(request: Request) -> JSONResponse:
        async with sessions.scope() as session:
            await session.execute(text(f"INSERT INTO {table} (name) VALUES ('raised')"))
            raise RuntimeError("after the insert")

    app = Starlette(routes=[Route("/add/{name}", add), Route("/raise", add_or_raise)])
    assert (await asgi_get(app, "/add/good"))[0] == 200
    assert (await asgi_get(app, "/raise"))[0] == 500
    assert await names_in(database, table) == ["good"]
    assert statistics(engine).checked_out == 0


async def test_engine_group_with_an_unpooled_engine_is_served_and_checked(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    primary = make_engine(name="primary", pool_size=2)
    analytics = create_analytics_engine(
        database.url, PoolConfig(name="analytics", application_name=app_name)
    )
    group = EngineGroup(primary, analytics=analytics)
    app = Starlette(routes=[Route("/health", health_endpoint())], lifespan=create_lifespan(group))
    try:
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
            health = await client.get("/health")
            assert health.status_code == 200
            pools = health.json()["pools"]
            assert pools["primary"]["idle"] == 2
            assert set(pools) == {"primary", "analytics"}
    finally:
        await analytics.dispose()
    assert statistics(primary).size == 0
