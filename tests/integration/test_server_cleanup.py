"""Nothing left behind on the server: cancelled work stops there too.

A caller that gives up mid-statement (``Task.cancel``, ``asyncio.timeout``, an
anyio cancel scope, a client hanging up on a Starlette app, ``command_timeout``)
must leave no statement running and no lock held on the server, and the
pool's bound must hold on the server too: a slot whose connection is still
being cancelled stays taken. Connections given back dirty (inside a
transaction SQLAlchemy does not track, mid-statement) never reach the next
user as they are, and a backend killed while idle never reaches a caller,
even inside the pre-ping skip window.

Every assertion here looks at the server: ``pg_stat_activity`` and row locks.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import anyio
import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from asyncpool import statistics
from asyncpool._classify import classify
from asyncpool.engine import pool_of
from asyncpool.starlette import Sessions
from tests.fix_db import EngineFactory, TestDatabase, wait_for_async, wait_until
from tests.fix_proxy import FaultProxy, proxied_url
from tests.integration.test_starlette import serve

#: How long after the cancellation the server must be clean (the issue's bound).
SERVER_CLEAN_WITHIN: Final = 0.5
#: The caller gives up this far into its statement.
CANCEL_AFTER: Final = 0.3


@pytest.fixture
async def row(database: TestDatabase, app_name: str) -> AsyncIterator[str]:
    """A one-row table that the cancelled work updates (and so row-locks)."""
    table = "row_" + app_name.removeprefix("ap-")
    await database.fetch(f"DROP TABLE IF EXISTS {table}")
    await database.fetch(f"CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)")
    await database.fetch(f"INSERT INTO {table} (id) VALUES (1)")
    yield table
    await database.fetch(f"DROP TABLE IF EXISTS {table}")


async def update_then_sleep(engine: AsyncEngine, table: str) -> None:
    """The unit of work: a write (a row lock) and then a slow statement."""
    async with engine.begin() as conn:
        await conn.execute(text(f"UPDATE {table} SET n = n + 1 WHERE id = 1"))
        await conn.execute(text("SELECT pg_sleep(5)"))


async def row_lockable(database: TestDatabase, table: str) -> bool:
    try:
        await database.fetch(f"SELECT n FROM {table} WHERE id = 1 FOR UPDATE NOWAIT")
    except asyncpg.LockNotAvailableError:
        return False
    return True


async def server_clean(database: TestDatabase, app_name: str, table: str) -> bool:
    return await database.sleeping(app_name) == 0 and await row_lockable(database, table)


async def assert_server_clean_soon(
    database: TestDatabase, app_name: str, table: str, since: float
) -> None:
    """Within SERVER_CLEAN_WITHIN of ``since``: nothing running, the row free."""
    await wait_for_async(
        lambda: server_clean(database, app_name, table),
        what="the statement to stop and its lock to go",
        within=SERVER_CLEAN_WITHIN + since - time.monotonic(),
    )


# ----------------------------------------------------- the ways to give up


async def by_task_cancel(engine: AsyncEngine, table: str) -> None:
    task = asyncio.ensure_future(update_then_sleep(engine, table))
    await asyncio.sleep(CANCEL_AFTER)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def by_asyncio_timeout(engine: AsyncEngine, table: str) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(CANCEL_AFTER):
            await update_then_sleep(engine, table)


async def by_anyio_cancel_scope(engine: AsyncEngine, table: str) -> None:
    with anyio.move_on_after(CANCEL_AFTER) as scope:
        await update_then_sleep(engine, table)
    assert scope.cancelled_caught


async def by_command_timeout(engine: AsyncEngine, table: str) -> None:
    with pytest.raises(Exception) as raised:
        await update_then_sleep(engine, table)
    # asyncpg's client-side timeout; psycopg's is the server's statement_timeout.
    assert classify(raised.value) in ("timeout", "statement_timeout")


async def by_client_hanging_up(engine: AsyncEngine, table: str) -> None:
    """A Starlette app whose streaming endpoint works in ``Sessions.scope()``;
    the HTTP client closes its socket mid-statement."""
    sessions = Sessions(engine)
    started = asyncio.Event()

    async def slow_write(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            async with sessions.scope() as session:
                await session.execute(text(f"UPDATE {table} SET n = n + 1 WHERE id = 1"))
                started.set()
                await session.execute(text("SELECT pg_sleep(5)"))
            yield b"done\n"

        return StreamingResponse(body(), media_type="text/plain")

    app = Starlette(routes=[Route("/write", slow_write)])
    async with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        client = socket.create_connection((host, int(port)))
        try:
            client.sendall(b"GET /write HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(started.wait(), 5)
            await asyncio.sleep(CANCEL_AFTER)
        finally:
            client.close()  # the client hangs up
        await wait_until(lambda: statistics(engine).checkouts == 1, what="the request")


GIVE_UPS: Final[dict[str, Callable[[AsyncEngine, str], Awaitable[None]]]] = {
    "task_cancel": by_task_cancel,
    "asyncio_timeout": by_asyncio_timeout,
    "anyio_cancel_scope": by_anyio_cancel_scope,
    "client_hang_up": by_client_hanging_up,
    "command_timeout": by_command_timeout,
}


@pytest.mark.parametrize("give_up", GIVE_UPS)
async def test_a_cancelled_statement_stops_on_the_server_and_releases_its_lock(
    give_up: str,
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    row: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings: dict[str, Any] = {"pool_size": 1, "max_overflow": 0}
    if give_up == "command_timeout":
        settings["command_timeout"] = CANCEL_AFTER
    engine = make_engine(**settings)
    await GIVE_UPS[give_up](engine, row)
    gave_up = time.monotonic()
    await assert_server_clean_soon(database, app_name, row, gave_up)
    # The write was rolled back, the connection cleaned and reused.
    assert await database.fetchval(f"SELECT n FROM {row} WHERE id = 1") == 0
    await wait_until(lambda: statistics(engine).checked_out == 0, what="the slot back")
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    stats = statistics(engine)
    # psycopg's command_timeout is the server's statement_timeout: the
    # statement ends on the server and nothing is left for a cleanup.
    cleaned = 0 if give_up == "command_timeout" and database.driver == "psycopg" else 1
    assert (stats.connects, stats.cleanups, stats.cleanups_reused) == (1, cleaned, cleaned)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# ------------------------------------------------------- the bound, held


async def sample_backends(
    database: TestDatabase, app_name: str, stop: asyncio.Event, every: float = 0.05
) -> list[int]:
    """The number of ``app_name`` backends every ``every`` seconds until ``stop``."""
    admin = await asyncpg.connect(database.dsn)
    counts: list[int] = []
    try:
        while not stop.is_set():
            counts.append(
                await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
                )
            )
            with_timeout = asyncio.ensure_future(stop.wait())
            await asyncio.wait([with_timeout], timeout=every)
            with_timeout.cancel()
    finally:
        await admin.close()
    return counts


async def deadline_storm(
    engine: AsyncEngine, seconds: float, *, workers: int = 6, deadline: float = 0.3
) -> list[float]:
    """Requests with ``deadline`` on ``pg_sleep(2)`` for ``seconds``; how long each took."""
    took: list[float] = []
    until = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                async with asyncio.timeout(deadline):
                    async with engine.connect() as conn:
                        await conn.execute(text("SELECT pg_sleep(2)"))
            except TimeoutError:
                pass
            took.append(time.monotonic() - started)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return took


async def test_a_storm_of_deadlines_never_exceeds_the_pools_bound_on_the_server(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0, pool_timeout=10)
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_backends(database, app_name, stop))
    try:
        took = await deadline_storm(engine, 3.0)
    finally:
        stop.set()
        counts = await sampler
    assert len(counts) >= 20 and len(took) >= 20
    # pool_size + max_overflow = 2; one more may be on its way out.
    assert max(counts) <= 3, counts
    assert max(took) < 0.3 + 0.2  # nobody waited on another's cleanup
    started = time.monotonic()
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert time.monotonic() - started < 0.5  # served at once afterwards
    stats = statistics(engine)
    assert stats.cleanups >= 10 and stats.cleanups_reused >= 10
    assert stats.connects <= 3
    await wait_for_async(
        lambda: no_statement_running(database, app_name), what="nothing running", within=2
    )


async def no_statement_running(database: TestDatabase, app_name: str) -> bool:
    states = [r["state"] for r in await database.backends(app_name)]
    return all(state == "idle" for state in states)


async def test_a_black_holed_network_mid_storm_bounds_every_caller_and_every_cleanup(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy, app_name: str
) -> None:
    engine = make_engine(
        proxied_url(database, fault_proxy),
        pool_size=2,
        max_overflow=0,
        pool_timeout=10,
        cleanup_timeout=1.0,
        connect_timeout=1.0,
    )
    storm = asyncio.ensure_future(deadline_storm(engine, 4.0))
    await asyncio.sleep(1.0)
    fault_proxy.black_hole()
    holed = time.monotonic()
    await wait_until(
        lambda: statistics(engine).cleanup_timeouts >= 1, what="a cleanup to give up", within=5
    )
    # Bounded by cleanup_timeout (1 s), from the black hole's start.
    assert time.monotonic() - holed < 1.0 + 0.3 + 0.5
    await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - holed)))
    fault_proxy.forward()
    took = await storm
    assert max(took) < 0.3 + 0.2  # no caller waited longer than its own deadline
    await wait_until(
        lambda: statistics(engine).checked_out == 0, what="nothing checked out", within=5
    )
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    # Aborted connections' backends stop within client_connection_check_interval.
    await wait_for_async(
        lambda: no_statement_running(database, app_name), what="nothing running", within=5
    )
    rows = await database.backends(app_name)
    assert len(rows) <= 2


# --------------------------------------------------------- dirty give-backs


async def test_a_connection_given_back_in_an_untracked_failed_transaction_is_rolled_back(
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    row: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with pytest.raises(Exception, match="division by zero"):
        async with autocommit.connect() as conn:
            await conn.execute(text("BEGIN"))  # SQLAlchemy does not track this one
            await conn.execute(text(f"UPDATE {row} SET n = 100 WHERE id = 1"))
            await conn.execute(text("SELECT 1 / 0"))
    async with autocommit.connect() as conn:  # the next user, on the same slot
        await conn.execute(text(f"UPDATE {row} SET n = n + 1 WHERE id = 1"))
    assert await database.fetchval(f"SELECT n FROM {row} WHERE id = 1") == 1
    assert await no_statement_running(database, app_name)
    if database.driver == "asyncpg":
        # psycopg's own rollback (SQLAlchemy's reset) ends the untracked block
        # even in autocommit: the pool sees a clean connection.
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("inside a transaction SQLAlchemy did not track" in w for w in warnings)
        reasons = pool_of(engine).state.counters.invalidations_by_reason
        assert reasons["returned_in_transaction"] == 1
    assert statistics(engine).connects == 1


async def test_a_begin_on_the_driver_connection_is_rolled_back_before_the_next_user(
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    row: str,
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.execute("BEGIN")
        await driver.execute(f"UPDATE {row} SET n = 100 WHERE id = 1")
    async with engine.begin() as conn:
        await conn.execute(text(f"UPDATE {row} SET n = n + 1 WHERE id = 1"))
    assert await database.fetchval(f"SELECT n FROM {row} WHERE id = 1") == 1
    assert await no_statement_running(database, app_name)


async def test_a_connection_given_back_mid_statement_never_reaches_the_next_user(
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    row: str,
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        left_running = asyncio.ensure_future(driver.execute("SELECT pg_sleep(5)"))
        await wait_for_async(lambda: database.any_sleeping(app_name), what="pg_sleep")
    async with engine.connect() as conn:  # waits for the cleanup, then a clean connection
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        next_driver = (await conn.get_raw_connection()).driver_connection
    assert next_driver is not driver
    with pytest.raises(Exception):  # noqa: B017 - cancelled on the server, then closed
        await left_running
    assert await database.sleeping(app_name) == 0
    reasons = pool_of(engine).state.counters.invalidations_by_reason
    if database.driver == "asyncpg":  # psycopg: refused at the reset, see test_cleanup_edges
        assert reasons["returned_mid_statement"] == 1


# ------------------------------------------------- killed while idle, at once

TRIALS: Final = 20


async def backend_gone(admin: asyncpg.Connection, pid: int) -> None:
    """Until ``pid`` left pg_stat_activity: the backend has sent its FATAL and is
    exiting; its socket closes a moment later (the window this test is about)."""
    for _ in range(5000):
        if not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"backend {pid} did not exit")


async def test_a_backend_killed_while_idle_never_reaches_a_caller_inside_the_skip_window(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)  # defaults: skip window 0.5 s
    admin = await asyncpg.connect(database.dsn)
    errors: list[str] = []
    try:
        for _ in range(TRIALS):
            async with engine.connect() as conn:
                pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await backend_gone(admin, pid)
            try:  # at once: well inside pre_ping_skip_window
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        await admin.close()
    assert errors == []
    stats = statistics(engine)
    assert stats.pre_ping_failures >= TRIALS - 2  # the rest were closed before checkout
