"""connection_budget against a server with a low max_connections, and 4 real processes.

The server allows 20 connections, 3 kept for superusers and 2 for
``pg_use_reserved_connections``; the application connects as an ordinary role,
so 15 are left for it, minus what others use. A group with a 5 + 5 primary
and an analytics limit of 2 wants 12 per process: 4 processes would open 48.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import queue
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import asyncpg
import pytest
from sqlalchemy import text

from asyncpool import BudgetExceededError, EngineGroup, PoolConfig, pool_lifespan
from asyncpool._classify import sqlstate_of
from asyncpool.budget import connection_budget
from asyncpool.embedded import EmbeddedPostgres
from asyncpool.routing import Route
from tests.fix_db import wait_for_async

PROCESSES: Final = 4
MAX_CONNECTIONS: Final = 20
SUPERUSER_RESERVED: Final = 3
RESERVED: Final = 2
ROLE: Final = "budget_app"
#: SQLSTATE 53300: "sorry, too many clients already" / "remaining connection slots are reserved".
TOO_MANY_CONNECTIONS: Final = "53300"

#: Load in each worker process: tasks x rounds x (read, write, analytics) sessions.
WORKER_TASKS: Final = 16
WORKER_ROUNDS: Final = 2
WORKER_SESSIONS: Final = WORKER_TASKS * WORKER_ROUNDS * 3

TOO_BIG = PoolConfig(pool_size=5, max_overflow=5, pool_timeout=20)


@pytest.fixture(scope="module")
def small_server() -> Iterator[EmbeddedPostgres]:
    settings = {
        "max_connections": MAX_CONNECTIONS,
        "superuser_reserved_connections": SUPERUSER_RESERVED,
        "reserved_connections": RESERVED,
    }
    with EmbeddedPostgres(settings=settings) as server:

        async def create_role() -> None:
            conn = await asyncpg.connect(server.dsn())
            try:
                await conn.execute(f"CREATE ROLE {ROLE} LOGIN")
                await conn.execute("CREATE TABLE budget_writes (n int)")
                await conn.execute(f"GRANT INSERT ON budget_writes TO {ROLE}")
            finally:
                await conn.close()

        asyncio.run(create_role())
        yield server


def app_url(server: EmbeddedPostgres) -> str:
    return f"postgresql+asyncpg://{ROLE}@127.0.0.1:{server.port}/postgres"


def make_group(server: EmbeddedPostgres, name: str, config: PoolConfig, limit: int) -> EngineGroup:
    return EngineGroup.create(
        app_url(server),
        analytics=app_url(server),
        name=name,
        config=config,
        analytics_limit=limit,
        sticky_window=0.0,
    )


@pytest.fixture
async def admin(small_server: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    """A superuser session held open all along: one connection "in use by others"."""
    conn = await asyncpg.connect(small_server.dsn())
    try:
        yield conn
    finally:
        await conn.close()


async def app_backends(admin: asyncpg.Connection) -> int:
    count = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND pid <> pg_backend_pid()",
        ROLE,
    )
    return int(count)


async def test_connection_budget_does_the_arithmetic_and_suggests_sizes_that_fit(
    small_server: EmbeddedPostgres, admin: asyncpg.Connection
) -> None:
    group = make_group(small_server, "bud-a", TOO_BIG, limit=2)
    try:
        budget = await connection_budget(group, processes=PROCESSES)
    finally:
        await group.dispose()
    (server,) = budget.servers
    assert server.server == f"127.0.0.1:{small_server.port}"
    assert (server.max_connections, server.superuser_reserved_connections) == (20, 3)
    assert (server.reserved_connections, server.in_use_by_others) == (2, 1)  # the admin
    assert server.available == 20 - 3 - 2 - 1 == 14
    assert (server.per_process, server.would_open) == (12, 48)
    assert not budget.fits and server.suggestion_fits
    primary, analytics = server.engines
    assert (primary.name, primary.role, primary.max_connections) == ("bud-a-primary", "primary", 10)
    assert (analytics.role, analytics.pool_size, analytics.max_overflow) == ("analytics", 0, 2)
    suggested = [(e.suggested_pool_size, e.suggested_max_overflow) for e in server.engines]
    assert suggested == [(1, 1), (0, 1)]
    assert PROCESSES * sum(e.suggested_max_connections for e in server.engines) <= 14


async def test_connections_of_the_fleet_itself_are_not_counted_as_others(
    small_server: EmbeddedPostgres, admin: asyncpg.Connection
) -> None:
    config = PoolConfig(pool_size=2, max_overflow=0, application_name="bud-shared")
    group = make_group(small_server, "bud-e", config, limit=1)
    async with pool_lifespan(group):  # 2 warm connections of ours, open now
        assert await app_backends(admin) == 2
        budget = await connection_budget(group, processes=PROCESSES)
    assert budget.servers[0].in_use_by_others == 1  # only the admin session
    assert budget.fits  # 4 x (2 + 1) = 12 <= 20 - 3 - 2 - 1 = 14


async def test_enforce_refuses_to_start_with_the_arithmetic_in_the_message(
    small_server: EmbeddedPostgres, admin: asyncpg.Connection
) -> None:
    group = make_group(small_server, "bud-b", TOO_BIG, limit=2)
    with pytest.raises(BudgetExceededError) as caught:
        async with pool_lifespan(group, budget="enforce", processes=PROCESSES):
            pytest.fail("started although the budget does not fit")
    message = str(caught.value)
    for part in (
        "max_connections 20",
        "superuser_reserved_connections 3",
        "reserved_connections 2",
        "1 in use by others",
        "= 14 available",
        "4 processes x 12 per process (bud-b-primary 10 + bud-b-analytics 2) = 48 at most",
        "34 too many",
        "bud-b-primary pool_size=1 max_overflow=1, bud-b-analytics analytics_limit=1",
        "(4 x 3 = 12)",
    ):
        assert part in message
    assert await app_backends(admin) == 0  # the probe connection was closed too


async def test_warn_logs_the_arithmetic_and_starts(
    small_server: EmbeddedPostgres, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    group = make_group(small_server, "bud-c", TOO_BIG, limit=2)
    with caplog.at_level(logging.WARNING, logger="asyncpool.budget"):
        async with pool_lifespan(group, budget="warn", processes=PROCESSES, warm=False):
            async with group.session(route="write") as session:
                assert await session.scalar(text("SELECT 1")) == 1
    (record,) = [r for r in caplog.records if r.name == "asyncpool.budget"]
    assert record.levelno == logging.WARNING
    assert "= 48 at most > max_connections 20" in record.getMessage()
    assert "= 14 available: 34 too many" in record.getMessage()


async def test_the_refused_configuration_really_runs_out_of_connections(
    small_server: EmbeddedPostgres,
) -> None:
    # The control, in one process: four copies of the refused group under load.
    groups = [make_group(small_server, f"bud-d{i}", TOO_BIG, limit=2) for i in range(PROCESSES)]
    try:
        errors = await asyncio.gather(*(load(g, tasks=12, rounds=3, hold=0.05) for g in groups))
    finally:
        for group in groups:
            await group.dispose()
    too_many = sum(e[TOO_MANY_CONNECTIONS] for e in errors)
    assert too_many > 0


@pytest.mark.slow  # the main pass runs it; the other passes deselect it
async def test_a_configuration_that_fits_runs_four_processes_under_load_without_too_many_clients(
    small_server: EmbeddedPostgres, admin: asyncpg.Connection
) -> None:
    fitting = PoolConfig(pool_size=1, max_overflow=1, pool_timeout=20)
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    processes = [
        ctx.Process(target=_worker, args=(small_server.port, worker, ready, go, out))
        for worker in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    peak = 0
    results: list[dict[str, Any]] = []
    try:
        for _ in range(PROCESSES):  # all started (budget enforced, pools warm) ...
            await asyncio.to_thread(ready.get, True, 60)
        go.set()  # ... then all load the server at once
        while len(results) < PROCESSES:
            peak = max(peak, await app_backends(admin))
            try:
                results.append(await asyncio.to_thread(out.get, True, 0.1))
            except queue.Empty:
                pass
    finally:
        for process in processes:
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                process.kill()
    errors = collections.Counter[str]()
    for result in results:
        errors.update(result["errors"])
    assert errors[TOO_MANY_CONNECTIONS] == 0
    assert not errors, errors
    assert all(result["budget_fits"] for result in results)
    assert sum(result["sessions"] for result in results) == PROCESSES * WORKER_SESSIONS
    per_process = fitting.max_size + 1  # primary 1 + 1, analytics 1
    assert PROCESSES < peak <= PROCESSES * per_process <= 14  # loaded at once, within budget
    await wait_for_async(lambda: _none_left(admin), what="the workers' connections to close")


async def _none_left(admin: asyncpg.Connection) -> bool:
    return await app_backends(admin) == 0


async def load(
    group: EngineGroup, *, tasks: int, rounds: int, hold: float
) -> collections.Counter[str]:
    """``tasks`` concurrent callers, each running ``rounds`` x (read, write, analytics) sessions."""
    errors: collections.Counter[str] = collections.Counter()
    routes: tuple[Route, ...] = ("read", "write", "analytics")

    async def caller(caller_id: int) -> None:
        for i in range(rounds * len(routes)):
            route = routes[(caller_id + i) % len(routes)]
            try:
                async with group.session(route=route) as session:
                    if route == "write":
                        await session.execute(
                            text("INSERT INTO budget_writes VALUES (:n)"), {"n": i}
                        )
                        await session.commit()
                    else:
                        await session.execute(text("SELECT pg_sleep(:s)"), {"s": hold})
            except Exception as exc:
                errors[sqlstate_of(exc) or type(exc).__name__] += 1

    await asyncio.gather(*(caller(c) for c in range(tasks)))
    return errors


async def _work(port: int, worker: int, ready: Any, go: Any) -> dict[str, Any]:
    server_url = f"postgresql+asyncpg://{ROLE}@127.0.0.1:{port}/postgres"
    group = EngineGroup.create(
        server_url,
        analytics=server_url,
        name="bud-w",  # the same names in every process, as in a real fleet
        config=PoolConfig(pool_size=1, max_overflow=1, pool_timeout=20),
        analytics_limit=1,
        sticky_window=0.0,
    )
    async with pool_lifespan(group, budget="enforce", processes=PROCESSES):
        budget = await connection_budget(group, processes=PROCESSES)
        ready.put(worker)
        await asyncio.to_thread(go.wait, 60)
        errors = await load(group, tasks=WORKER_TASKS, rounds=WORKER_ROUNDS, hold=0.002)
    return {"errors": dict(errors), "budget_fits": budget.fits, "sessions": WORKER_SESSIONS}


def _worker(port: int, worker: int, ready: Any, go: Any, out: Any) -> None:
    out.put(asyncio.run(_work(port, worker, ready, go)))
