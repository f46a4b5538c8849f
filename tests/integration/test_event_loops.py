"""A pool belongs to one event loop: a live foreign loop is refused, a closed owner is let go."""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings

import pytest
from sqlalchemy import text

from asyncpool import WrongEventLoopError, create_pooled_engine, statistics
from tests.fix_db import EngineFactory, TestDatabase, wait_for_async
from tests.fix_loops import run


def settle_backends(database: TestDatabase, app_name: str, at_most: int) -> int:
    """Wait (bounded) until at most ``at_most`` backends of the app remain; return the count."""

    async def check() -> int:
        async def few_enough() -> bool:
            return len(await database.backends(app_name)) <= at_most

        await wait_for_async(few_enough, what=f"at most {at_most} backends", within=5)
        return len(await database.backends(app_name))

    return run(check())


async def test_use_from_a_second_running_loop_raises_wrong_event_loop(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(name="owned", pool_size=2, max_overflow=0)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))

    caught: list[BaseException] = []

    async def use_from_other_loop() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    def thread_main() -> None:
        try:
            run(asyncio.wait_for(use_from_other_loop(), 5))
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=thread_main)
    thread.start()
    await asyncio.to_thread(thread.join, 10)
    assert len(caught) == 1
    error = caught[0]
    assert isinstance(error, WrongEventLoopError)
    assert "'owned'" in str(error)
    assert "attached to a different loop" not in str(error)
    # The owner is unharmed.
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert statistics(engine).checked_out == 0


def test_fifty_asyncio_runs_on_one_engine_leave_no_backend_behind(
    database: TestDatabase, app_name: str
) -> None:
    engine = create_pooled_engine(
        database.url, pool_size=3, max_overflow=0, application_name=app_name
    )

    async def job() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())

    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(50):
            seen.add(run(job()))
            assert settle_backends(database, app_name, at_most=1) <= 1
        stats = statistics(engine)
        assert stats.checkouts == 50 and stats.checked_out == 0
        assert stats.invalidations == 50  # one closed as each loop ended
        run(engine.dispose())
        gc.collect()
    assert len(seen) == 50  # every run got its own backend
    assert settle_backends(database, app_name, at_most=0) == 0


async def test_dispose_then_use_from_a_new_loop_is_allowed(
    database: TestDatabase, app_name: str
) -> None:
    engine = create_pooled_engine(database.url, pool_size=1, application_name=app_name)

    def in_new_loop() -> int:
        async def job() -> int:
            async with engine.connect() as conn:
                value = int((await conn.execute(text("SELECT 7"))).scalar_one())
            await engine.dispose()
            return value

        return run(job())

    assert await asyncio.to_thread(in_new_loop) == 7
    # The other loop disposed the pool and closed; this loop may now adopt it.
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 8"))).scalar_one() == 8
    await engine.dispose()


@pytest.mark.parametrize("runs", [3])
def test_idle_connections_are_released_on_the_server_when_their_loop_ends(
    database: TestDatabase, app_name: str, runs: int
) -> None:
    engine = create_pooled_engine(
        database.url, pool_size=4, max_overflow=0, application_name=app_name
    )

    async def open_four() -> None:
        conns = [await engine.connect() for _ in range(4)]
        for conn in conns:
            await conn.execute(text("SELECT 1"))
        for conn in conns:
            await conn.close()

    for _ in range(runs):
        run(open_four())
        # Closed as the loop ended, which no other loop could use them after.
        assert settle_backends(database, app_name, at_most=0) == 0
    run(engine.dispose())
    assert statistics(engine).invalidations == 4 * runs


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_job_per_loop_five_times_on_one_engine_succeeds_every_time(
    database: TestDatabase, app_name: str, loop: str
) -> None:
    # uvloop's transports have no shutdown(): dropping a closed loop's
    # connections raised TypeError in runs 2 and 4.
    engine = create_pooled_engine(database.url, pool_size=2, application_name=app_name)

    async def job() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT 1"))).scalar_one())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [run(job(), loop) for _ in range(5)] == [1] * 5
        run(engine.dispose(), loop)
        gc.collect()
    assert settle_backends(database, app_name, at_most=0) == 0
