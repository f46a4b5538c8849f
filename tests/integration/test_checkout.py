"""Fair checkout: FIFO hand-off, exact counters for waits, timeouts and rejections."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from asyncpool import PoolOverloadedError, PoolTimeoutError, statistics
from asyncpool.embedded import free_port
from asyncpool.engine import pool_of
from tests.fix_db import EngineFactory, TestDatabase, wait_for_async, wait_until


async def checkout(engine: AsyncEngine) -> AsyncConnection:
    return await engine.connect()


async def test_engine_is_a_genuine_async_engine_that_sessions_use(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session:
        assert isinstance(session, AsyncSession)
        assert (await session.execute(text("SELECT 41 + 1"))).scalar_one() == 42
    stats = statistics(engine)
    assert (stats.checkouts, stats.checked_out, stats.idle, stats.connects) == (1, 0, 1, 1)


async def test_engine_sets_application_name_and_timeouts(
    make_engine: EngineFactory, app_name: str
) -> None:
    engine = make_engine(command_timeout=0.2)
    async with engine.connect() as conn:
        name = (await conn.execute(text("SELECT current_setting('application_name')"))).scalar()
        assert name == app_name
        started = time.perf_counter()
        with pytest.raises((TimeoutError, sa_exc.DBAPIError)):
            await conn.execute(text("SELECT pg_sleep(5)"))
        assert time.perf_counter() - started < 2


async def test_returned_connection_goes_to_waiters_in_arrival_order(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=5)
    holder = await engine.connect()
    served: list[int] = []

    async def wait_turn(i: int) -> None:
        async with engine.connect() as conn:
            served.append(i)
            await conn.execute(text("SELECT 1"))

    tasks = []
    for i in range(8):
        tasks.append(asyncio.create_task(wait_turn(i)))
        await wait_until(lambda n=i + 1: statistics(engine).waiting == n, what=f"{i + 1} waiters")
    await holder.close()
    await asyncio.gather(*tasks)
    assert served == list(range(8))
    assert statistics(engine).waits == 8


async def test_newcomer_never_overtakes_a_waiter(make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=5)
    holder = await engine.connect()
    order: list[str] = []

    async def take(label: str) -> None:
        async with engine.connect():
            order.append(label)

    waiter = asyncio.create_task(take("waiter"))
    await wait_until(lambda: statistics(engine).waiting == 1, what="the waiter to queue")
    await holder.close()
    # The connection is back, but it belongs to the waiter: a caller arriving
    # now, before the waiter has run, must queue behind it.
    newcomer = asyncio.create_task(take("newcomer"))
    await asyncio.gather(waiter, newcomer)
    assert order == ["waiter", "newcomer"]


async def test_nobody_starves_when_tasks_check_out_again_at_once(
    make_engine: EngineFactory,
) -> None:
    # The barging scenario, scaled down: 20 tasks loop on 2 connections. An
    # unfair pool lets the returning task take its connection back at once and
    # starves the queue into timeouts; a FIFO pool serves everybody.
    engine = make_engine(pool_size=2, max_overflow=0, pool_timeout=2)
    served = dict.fromkeys(range(20), 0)
    stop = time.monotonic() + 1.5

    async def loop_forever(i: int) -> None:
        while time.monotonic() < stop:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(0.01)"))
            served[i] += 1

    await asyncio.gather(*(loop_forever(i) for i in range(20)))
    stats = statistics(engine)
    assert stats.timeouts == 0
    assert min(served.values()) >= 2, served
    assert max(served.values()) - min(served.values()) <= 2, served


async def test_overflow_connections_open_under_load_and_close_when_returned(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(pool_size=2, max_overflow=2, idle_timeout=None)
    conns = [await engine.connect() for _ in range(4)]
    for conn in conns:
        await conn.execute(text("SELECT 1"))
    stats = statistics(engine)
    assert (stats.checked_out, stats.overflow, stats.size, stats.max_size) == (4, 2, 4, 4)
    for conn in conns:
        await conn.close()
    stats = statistics(engine)
    assert (stats.checked_out, stats.idle, stats.overflow, stats.size) == (0, 2, 0, 2)


async def test_waits_and_timeouts_are_counted_exactly(make_engine: EngineFactory) -> None:
    engine = make_engine(name="orders", pool_size=1, max_overflow=0, pool_timeout=0.2)
    holder = await engine.connect()
    results = await asyncio.gather(*(engine.connect() for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, PoolTimeoutError) for r in results)
    error = results[0]
    assert isinstance(error, sa_exc.TimeoutError)
    assert isinstance(error, PoolTimeoutError)
    message = str(error)
    assert "'orders'" in message and "pool_size=1" in message and "max_overflow=0" in message
    assert error.waited >= 0.2 and error.pool_name == "orders"
    stats = statistics(engine)
    assert (stats.waits, stats.timeouts, stats.rejected, stats.waiting) == (3, 3, 0, 0)
    assert stats.wait_seconds_max >= 0.2
    assert stats.wait_seconds_total >= 0.6
    await holder.close()
    async with engine.connect():
        pass
    assert statistics(engine).checked_out == 0


async def test_max_waiting_refuses_at_once_and_counts_rejections(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=5, max_waiting=2)
    holder = await engine.connect()
    waiters = [asyncio.create_task(checkout(engine)) for _ in range(2)]
    await wait_until(lambda: statistics(engine).waiting == 2, what="two waiters")
    started = time.perf_counter()
    with pytest.raises(PoolOverloadedError) as info:
        await engine.connect()
    assert time.perf_counter() - started < 0.5  # at once, not after pool_timeout
    assert isinstance(info.value, PoolTimeoutError)
    assert "max_waiting=2" in str(info.value) and "2 callers already wait" in str(info.value)
    stats = statistics(engine)
    assert (stats.rejected, stats.waiting, stats.timeouts) == (1, 2, 0)
    await holder.close()
    for task in waiters:
        await (await task).close()
    assert statistics(engine).checked_out == 0


async def test_cancelled_waiting_checkout_leaks_nothing(make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=5)
    holder = await engine.connect()
    waiter = asyncio.create_task(checkout(engine))
    await wait_until(lambda: statistics(engine).waiting == 1, what="the waiter to queue")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    stats = statistics(engine)
    assert (stats.waiting, stats.checked_out) == (0, 1)
    await holder.close()
    assert statistics(engine).checked_out == 0
    started = time.perf_counter()
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    assert time.perf_counter() - started < 1.0


async def test_waiter_cancelled_just_after_being_handed_a_connection_passes_it_on(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=5)
    holder = await engine.connect()
    first = asyncio.create_task(checkout(engine))
    second = asyncio.create_task(checkout(engine))
    await wait_until(lambda: statistics(engine).waiting == 2, what="two waiters")
    await holder.close()  # hands the connection to `first`...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    conn: AsyncConnection = await asyncio.wait_for(second, 2)
    assert statistics(engine).checked_out == 1
    await conn.close()
    assert statistics(engine).checked_out == 0


async def test_failed_connect_frees_its_slot_for_the_next_caller(
    make_engine: EngineFactory,
) -> None:
    closed_port = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test"
    engine = make_engine(closed_port, pool_size=1, max_overflow=0, connect_timeout=2)
    for _ in range(3):  # a leaked slot would turn the 2nd attempt into a pool timeout
        with pytest.raises(OSError):
            await engine.connect()
    stats = statistics(engine)
    assert (stats.connect_errors, stats.connects, stats.checked_out, stats.timeouts) == (3, 0, 0, 0)


async def test_a_connection_returned_after_dispose_is_closed_not_parked(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0)
    conn = await engine.connect()
    await conn.execute(text("SELECT 1"))
    old_pool = pool_of(engine)
    await engine.dispose()  # the engine gets a new pool; this connection is still out
    await conn.close()
    assert old_pool.live_idle() == 0
    await wait_for_async(
        lambda: _no_backends(database, app_name), what="the backend to end", within=5
    )


async def _no_backends(database: TestDatabase, app_name: str) -> bool:
    return not await database.backends(app_name)


async def test_a_connection_past_pool_recycle_is_replaced_and_counted(
    make_engine: EngineFactory,
) -> None:
    # recycle_jitter=0: one lifetime, checked at checkout (the background
    # replacement of jittered lifetimes has its own tests in test_upkeep.py).
    engine = make_engine(pool_size=1, max_overflow=0, pool_recycle=0.05, recycle_jitter=0)
    query = text("SELECT pg_backend_pid()")
    async with engine.connect() as conn:
        first = (await conn.execute(query)).scalar_one()
    await asyncio.sleep(0.1)  # the connection ages past pool_recycle: the behaviour under test
    async with engine.connect() as conn:
        second = (await conn.execute(query)).scalar_one()
    assert first != second
    stats = statistics(engine)
    # Replaced once: by the checkout, or by the maintenance just before it.
    assert stats.recycles - stats.background_recycles <= 1
    assert (stats.recycles, stats.connects, stats.pre_ping_failures) in ((1, 2, 0), (2, 3, 0))
