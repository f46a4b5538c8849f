"""A pool per live event loop (issue 18): ``PoolConfig(pool_per_loop=True)``.

Threads each running their own loop (``asyncpool.run`` from a thread pool,
threaded servers) share one engine: each loop gets its own pool with the
engine's settings, the engine's numbers are their sum, a loop's pool goes
when its loop closes, and ``max_loops`` bounds them. Without the setting the
second live loop gets ``WrongEventLoopError``, as documented.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import uvloop
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncpool
from asyncpool import ConfigurationError, WrongEventLoopError, statistics
from asyncpool.budget import _share
from tests.fix_db import SyncEngineFactory, TestDatabase, wait_for_async

THREADS = 4
CALLS = 25

LoopFactory = Callable[[], asyncio.AbstractEventLoop] | None


async def job(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_sleep(0.005)"))
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


def in_threads(engine: AsyncEngine, loop_factory: LoopFactory = None) -> list[Any]:
    """``THREADS`` threads at once, each ``CALLS`` calls of ``asyncpool.run(job())``;
    each thread closes its kept loop at the end (disposing its pool)."""
    start = threading.Barrier(THREADS)

    def worker() -> list[Any]:
        start.wait()
        out: list[Any] = []
        try:
            for _ in range(CALLS):
                try:
                    out.append(asyncpool.run(job(engine), loop_factory=loop_factory))
                except WrongEventLoopError as exc:
                    out.append(exc)
        finally:
            asyncpool.runner.close()
        return out

    with ThreadPoolExecutor(THREADS) as threads:
        futures = [threads.submit(worker) for _ in range(THREADS)]
        return [result for future in futures for result in future.result()]


def no_backends_left(database: TestDatabase, app_name: str) -> None:
    async def none() -> bool:
        return not await database.backends(app_name)

    asyncio.run(wait_for_async(none, what="every backend to close", within=10))


@pytest.mark.parametrize("loop_factory", [None, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_four_threads_share_one_engine_with_a_pool_per_loop(
    make_sync_engine: SyncEngineFactory,
    database: TestDatabase,
    app_name: str,
    loop_factory: LoopFactory,
) -> None:
    engine = make_sync_engine(pool_size=2, max_overflow=0, pool_per_loop=True)
    results = in_threads(engine, loop_factory)
    assert len(results) == THREADS * CALLS
    assert all(isinstance(pid, int) for pid in results)
    stats = statistics(engine)
    assert stats.checkouts == THREADS * CALLS
    assert stats.connects <= THREADS * 2
    assert stats.max_size == 2 * 8  # pool_size per loop x max_loops
    no_backends_left(database, app_name)  # each thread's loop closed with its pool
    assert statistics(engine).loops == 0


def test_without_it_a_second_live_loop_gets_wrong_event_loop_error(
    make_sync_engine: SyncEngineFactory,
) -> None:
    engine = make_sync_engine(pool_size=2, max_overflow=0)
    results = in_threads(engine)
    errors = [r for r in results if isinstance(r, WrongEventLoopError)]
    assert errors and len(errors) < len(results)
    assert "create one engine per loop" in str(errors[0])


def test_loops_beyond_max_loops_get_a_clear_error_and_closed_loops_free_their_place(
    make_sync_engine: SyncEngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_sync_engine(pool_size=1, max_overflow=0, pool_per_loop=True, max_loops=2)
    first, second, third = (asyncio.new_event_loop() for _ in range(3))
    try:
        first.run_until_complete(job(engine))
        second.run_until_complete(job(engine))
        assert statistics(engine).loops == 2
        with pytest.raises(WrongEventLoopError, match="max_loops=2"):
            third.run_until_complete(job(engine))
        first.close()  # its pool goes without any I/O on the dead loop
        third.run_until_complete(job(engine))
        stats = statistics(engine)
        assert (stats.loops, stats.size, stats.connects) == (2, 2, 3)

        async def one_left() -> bool:
            return len(await database.backends(app_name)) == 2

        asyncio.run(wait_for_async(one_left, what="the closed loop's backend to go"))
        for loop in (second, third):
            loop.run_until_complete(engine.dispose())
    finally:
        for loop in (first, second, third):
            loop.close()
    no_backends_left(database, app_name)


def test_the_budget_counts_max_loops_and_resize_is_refused(
    make_sync_engine: SyncEngineFactory,
) -> None:
    engine = make_sync_engine(pool_size=2, max_overflow=1, pool_per_loop=True, max_loops=4)
    assert _share(engine).max_connections == (2 + 1) * 4
    with pytest.raises(ConfigurationError, match="pool_per_loop"):
        asyncpool.resize(engine, pool_size=3)
