"""Cancellation never leaks a connection.

Thousands of cancellations land at random points of a unit of work (waiting
for a checkout, connecting, pre-pinging, mid-query, inside a transaction that
holds a row lock, committing, giving the connection back) under asyncio's
``Task.cancel`` and ``asyncio.timeout``, under anyio cancel scopes (which
re-cancel at every await of the cleanup), and through a real Starlette app
behind ``BaseHTTPMiddleware`` whose HTTP clients hang up mid-response. After
each storm: nothing checked out, no backend ``idle in transaction``, no row
lock held, nothing for the garbage collector to complain about, and the next
checkout is immediate.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Final

import anyio
import httpx
import pytest
import uvicorn
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Send

from asyncpool import statistics
from asyncpool.engine import pool_of
from tests.fix_db import EngineFactory, TestDatabase, wait_for_async, wait_until
from tests.fix_proxy import FaultProxy, proxied_url

ROWS: Final = 20
#: Fewer connections than workers, so cancellations also hit queued checkouts;
#: every checkout pings, so they also hit pre-pings.
POOL: Final[dict[str, Any]] = {
    "pool_size": 4,
    "max_overflow": 2,
    "pool_timeout": 10,
    "pre_ping_skip_window": 0,
}
WORKERS: Final = 16
CANCELLATIONS: Final = 1000
#: A storm that takes longer than this on a loaded machine fails, never hangs.
STORM_LIMIT: Final = 40.0


@pytest.fixture
async def rows_table(database: TestDatabase, app_name: str) -> AsyncIterator[str]:
    """A table of ``ROWS`` rows that units of work lock and update."""
    table = "rows_" + app_name.removeprefix("ap-")
    await database.fetch(f"DROP TABLE IF EXISTS {table}")
    await database.fetch(f"CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)")
    await database.fetch(f"INSERT INTO {table} (id) SELECT generate_series(1, {ROWS})")
    yield table
    await database.fetch(f"DROP TABLE IF EXISTS {table}")


async def lock_and_update(engine: AsyncEngine, table: str, row: int, use_session: bool) -> None:
    """The unit of work: a transaction that row-locks, updates and commits."""
    lock = text(f"SELECT n FROM {table} WHERE id = :id FOR UPDATE")
    update = text(f"UPDATE {table} SET n = n + 1 WHERE id = :id")
    if use_session:
        sessions = async_sessionmaker(engine)
        async with sessions() as session, session.begin():
            await session.execute(lock, {"id": row})
            await session.execute(update, {"id": row})
    else:
        async with engine.begin() as conn:
            await conn.execute(lock, {"id": row})
            await conn.execute(update, {"id": row})


class Storm:
    """Workers that run cancellable units of work until enough were cancelled."""

    def __init__(self, engine: AsyncEngine, table: str, seed: int) -> None:
        self.engine = engine
        self.table = table
        self.rng = random.Random(seed)
        self.cancelled = 0
        self.completed = 0
        self.max_deadline = 0.0

    def work(self) -> Awaitable[None]:
        rng = self.rng
        return lock_and_update(self.engine, self.table, rng.randint(1, ROWS), rng.random() < 0.5)

    def deadline(self) -> float:
        return self.rng.uniform(0, self.max_deadline)

    async def calibrate(self) -> None:
        """Deadlines from 0 to half what a unit of work takes under this load (its median)."""

        async def timed() -> float:
            started = time.perf_counter()
            await self.work()
            return time.perf_counter() - started

        durations = await asyncio.gather(*(timed() for _ in range(2 * WORKERS)))
        self.max_deadline = 0.5 * sorted(durations)[len(durations) // 2]

    async def run(self, one: Callable[[], Awaitable[bool]], *, target: int) -> None:
        """Run ``one()`` (True when it was cancelled) on WORKERS tasks until ``target``."""
        await self.calibrate()
        limit = time.monotonic() + STORM_LIMIT

        async def worker() -> None:
            while self.cancelled < target:
                assert time.monotonic() < limit, f"only {self.cancelled} cancellations so far"
                if await one():
                    self.cancelled += 1
                else:
                    self.completed += 1

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        assert self.cancelled >= target
        # Cancellations landed while waiting for a checkout, and while a
        # connection was in use (mid-ping, mid-query, mid-commit: its state
        # unknown, so it was invalidated).
        counters = pool_of(self.engine).state.counters
        assert counters.waits > 0 and counters.invalidations_by_reason["cancelled"] > 0


async def assert_nothing_leaked(
    engine: AsyncEngine,
    database: TestDatabase,
    app_name: str,
    table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The state after a storm: the must-shows of the cancellation invariant."""
    # Connects a cancelled caller left behind still finish into the pool, and
    # connections being cleaned hold their slots until their statements are
    # stopped on the server and rolled back.
    await wait_until(lambda: statistics(engine).checked_out == 0, what="all connections back")
    # So by now no statement is left running on the server: no polling.
    running = await database.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'",
        app_name,
    )
    assert running == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(w.message) for w in caught] == []

    max_size = pool_of(engine).state.config.max_size

    async def backends_settled() -> bool:
        rows = await database.backends(app_name)
        return all(r["state"] == "idle" for r in rows) and len(rows) <= max_size

    # A backend whose connection was aborted needs a moment to notice and exit.
    await wait_for_async(backends_settled, what="no backend busy or idle in transaction")

    async def all_rows_lockable() -> bool:
        locked = await database.fetchval(
            f"WITH l AS (SELECT id FROM {table} FOR UPDATE SKIP LOCKED) SELECT count(*) FROM l"
        )
        return bool(locked == ROWS)

    await wait_for_async(all_rows_lockable, what="every row lock released")
    # ...and a plain NOWAIT lock of every row now succeeds outright.
    nowait = f"WITH l AS (SELECT id FROM {table} FOR UPDATE NOWAIT) SELECT count(*) FROM l"
    assert await database.fetchval(nowait) == ROWS

    started = time.perf_counter()
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert time.perf_counter() - started < 1.0
    stats = statistics(engine)
    assert (stats.checked_out, stats.waiting, stats.timeouts) == (0, 0, 0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_thousands_of_task_cancels_at_random_points_leak_no_connection(
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    rows_table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(**POOL)
    storm = Storm(engine, rows_table, seed=1)
    loop = asyncio.get_running_loop()

    async def one() -> bool:
        task = asyncio.ensure_future(storm.work())
        loop.call_later(storm.deadline(), task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    await storm.run(one, target=CANCELLATIONS)
    await assert_nothing_leaked(engine, database, app_name, rows_table, caplog)


async def test_thousands_of_asyncio_timeouts_at_random_points_leak_no_connection(
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    rows_table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(**POOL)
    storm = Storm(engine, rows_table, seed=2)

    async def one() -> bool:
        try:
            async with asyncio.timeout(storm.deadline()):
                await storm.work()
        except TimeoutError:
            return True
        return False

    await storm.run(one, target=CANCELLATIONS)
    await assert_nothing_leaked(engine, database, app_name, rows_table, caplog)


async def test_thousands_of_anyio_cancel_scopes_at_random_points_leak_no_connection(
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    rows_table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # anyio cancellation is level-triggered: every await of the cleanup
    # (rollback, close, give-back) is cancelled again, which defeats a plain
    # asyncio.shield. Half the scopes expire by deadline, half are cancelled
    # by another task.
    engine = make_engine(**POOL)
    storm = Storm(engine, rows_table, seed=3)

    async def one() -> bool:
        if storm.rng.random() < 0.5:
            with anyio.move_on_after(storm.deadline()) as scope:
                await storm.work()
            return scope.cancelled_caught
        async with anyio.create_task_group() as group:
            with anyio.CancelScope() as scope:

                async def cancel_later(delay: float) -> None:
                    await anyio.sleep(delay)
                    scope.cancel()

                group.start_soon(cancel_later, storm.deadline())
                await storm.work()
            group.cancel_scope.cancel()
        return scope.cancelled_caught

    await storm.run(one, target=CANCELLATIONS)
    await assert_nothing_leaked(engine, database, app_name, rows_table, caplog)


async def test_anyio_cancel_inside_a_transaction_stops_the_statement_and_reuses_the_connection(
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    rows_table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    locked = anyio.Event()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:

            async def hold_lock() -> None:
                async with engine.begin() as conn:
                    await conn.execute(text(f"SELECT n FROM {rows_table} WHERE id = 1 FOR UPDATE"))
                    locked.set()
                    await conn.execute(text("SELECT pg_sleep(30)"))

            group.start_soon(hold_lock)
            await locked.wait()
            scope.cancel()
    # The caller is gone at once; the pool cancels the statement on the
    # server and rolls back in a task of its own, holding the slot meanwhile.
    await wait_until(lambda: statistics(engine).checked_out == 0, what="the cleanup")
    counters = pool_of(engine).state.counters
    assert counters.invalidations_by_reason["cancelled"] == 1
    assert (counters.cleanups, counters.cleanups_reused, counters.connects) == (1, 1, 1)
    await assert_nothing_leaked(engine, database, app_name, rows_table, caplog)


async def test_cancel_during_pre_ping_frees_the_slot_at_once(
    make_engine: EngineFactory,
    database: TestDatabase,
    fault_proxy: FaultProxy,
    app_name: str,
    rows_table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(
        proxied_url(database, fault_proxy), pool_size=1, max_overflow=0, pre_ping_skip_window=0
    )
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    fault_proxy.latency = 0.3  # the ping's answer takes 0.3 s: time to cancel it
    checkout = asyncio.ensure_future(engine.connect())
    await wait_until(lambda: statistics(engine).pre_pings == 1, what="the pre-ping to start")
    checkout.cancel()
    with pytest.raises(asyncio.CancelledError):
        await checkout
    stats = statistics(engine)
    assert (stats.checked_out, stats.invalidations) == (0, 1)
    fault_proxy.latency = 0.0
    await assert_nothing_leaked(engine, database, app_name, rows_table, caplog)


async def test_cancel_during_connect_leaves_the_new_connection_to_the_pool(
    make_engine: EngineFactory,
    database: TestDatabase,
    fault_proxy: FaultProxy,
    app_name: str,
    rows_table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A caller that gives up mid-handshake does not waste it: the connect
    # finishes on its own (bounded by connect_timeout) and the connection
    # goes to the next caller. Otherwise deadlines shorter than a connect
    # would keep the pool from ever opening one.
    engine = make_engine(proxied_url(database, fault_proxy), pool_size=1, max_overflow=0)
    fault_proxy.latency = 0.05
    checkout = asyncio.ensure_future(engine.connect())
    await wait_until(lambda: fault_proxy.connections == 1, what="the connect to start")
    checkout.cancel()
    with pytest.raises(asyncio.CancelledError):
        await checkout
    await wait_until(lambda: statistics(engine).idle == 1, what="the connect to finish")
    fault_proxy.latency = 0.0
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    stats = statistics(engine)
    assert (stats.connects, stats.connect_errors, stats.checked_out) == (1, 0, 0)
    await assert_nothing_leaked(engine, database, app_name, rows_table, caplog)


# ------------------------------------------------------- Starlette over HTTP

HTTP_REQUESTS: Final = 160
HTTP_CLIENTS: Final = 16


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body generator however it ends."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            body = self.body_iterator
            if isinstance(body, AsyncGenerator):
                await body.aclose()  # cancelled again at once under a cancelled scope


async def serve(app: Starlette) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    """Run ``app`` under uvicorn on a free loopback port, in this event loop."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    await wait_until(lambda: server.started or task.done(), what="uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, f"http://127.0.0.1:{port}"


async def test_clients_hanging_up_on_a_base_http_middleware_app_leak_no_connection(
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    rows_table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The reported failure (sqlalchemy#12077, aegra#530): a streaming endpoint
    # behind BaseHTTPMiddleware holds a session; the client disconnects;
    # Starlette cancels the response's task group (an anyio cancel scope), so
    # every await of the session's cleanup is cancelled again.
    #
    # Starlette's StreamingResponse does not close its body iterator when it
    # is cancelled: a generator cancelled while the response awaited send()
    # stays suspended at its `yield`, holding its connection and row lock
    # until the garbage collector finds it; no code of the pool runs. Closing
    # the iterator (ClosingStreamingResponse) turns that into a cancellation
    # inside the session's cleanup, which the pool must survive.
    engine = make_engine(**POOL)
    sessions = async_sessionmaker(engine)
    rng = random.Random(4)
    interrupted = 0

    class PassThrough(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            return await call_next(request)

    async def locked_stream(request: Request) -> Response:
        row = int(request.path_params["row"])

        async def body() -> AsyncIterator[bytes]:
            nonlocal interrupted
            try:
                async with sessions() as session, session.begin():
                    lock = f"SELECT n FROM {rows_table} WHERE id = :id FOR UPDATE"
                    await session.execute(text(lock), {"id": row})
                    yield b"locked\n"
                    await session.execute(text("SELECT pg_sleep(:s)"), {"s": rng.uniform(0, 0.03)})
                    update = f"UPDATE {rows_table} SET n = n + 1 WHERE id = :id"
                    await session.execute(text(update), {"id": row})
                    yield b"updated\n"
                yield b"committed\n"
            except anyio.get_cancelled_exc_class():
                interrupted += 1
                raise

        return ClosingStreamingResponse(body(), media_type="text/plain")

    app = Starlette(
        routes=[Route("/rows/{row:int}", locked_stream)], middleware=[Middleware(PassThrough)]
    )
    server, server_task, base_url = await serve(app)
    hung_up = completed = 0
    try:
        queue = list(range(HTTP_REQUESTS))

        async def client() -> None:
            nonlocal hung_up, completed
            # No keep-alive: one connection per request, so hanging up closes it.
            no_keep_alive = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(
                base_url=base_url, timeout=10, limits=no_keep_alive
            ) as http:
                while queue:
                    queue.pop()
                    hang_up = rng.random() < 0.6
                    path = f"/rows/{rng.randint(1, ROWS)}"
                    async with http.stream("GET", path) as response:
                        lines = response.aiter_lines()
                        assert await anext(lines) == "locked"
                        if hang_up:
                            await asyncio.sleep(rng.uniform(0, 0.02))
                            hung_up += 1
                            continue
                        assert [line async for line in lines] == ["updated", "committed"]
                        completed += 1

        await asyncio.gather(*(client() for _ in range(HTTP_CLIENTS)))
        # Disconnects reached the app as cancellations (those that landed
        # after the commit cancel nothing).
        await wait_until(lambda: interrupted > 0, what="a disconnect to cancel a request")
        assert hung_up + completed == HTTP_REQUESTS and completed > 0
    finally:
        server.should_exit = True
        await server_task
    await assert_nothing_leaked(engine, database, app_name, rows_table, caplog)
