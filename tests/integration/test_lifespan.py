"""pool_lifespan(): warm before serving, fail fast and clearly, drain and dispose on the way out."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from asyncpool import (
    ConfigurationError,
    DatabaseUnavailableError,
    PoolClosedError,
    pool_lifespan,
    statistics,
)
from asyncpool.embedded import free_port
from asyncpool.engine import pool_of
from tests.fix_db import EngineFactory, TestDatabase, wait_for_async, wait_until
from tests.fix_lifespan import PASSWORD, PasswordServer


@dataclass
class Group:
    """Stands in for asyncpool.EngineGroup: anything with an ``engines`` iterable."""

    engines: list[AsyncEngine] = field(default_factory=list)


async def backend_count(database: TestDatabase, app_name: str) -> int:
    return len(await database.backends(app_name))


async def test_pool_is_warm_to_min_idle_before_the_body_runs(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=5, min_idle=3)
    async with pool_lifespan(engine) as engines:
        assert engines == (engine,)
        stats = statistics(engine)
        assert (stats.idle, stats.checked_out, stats.connects) == (3, 0, 3)
        assert await backend_count(database, app_name) == 3
    assert statistics(engine).size == 0


async def test_min_idle_defaults_to_pool_size(make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=4)
    async with pool_lifespan(engine):
        assert statistics(engine).idle == 4


async def test_groups_are_flattened_and_each_engine_is_warmed_once(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    first = make_engine(name="first", pool_size=2)
    second = make_engine(name="second", pool_size=1)
    async with pool_lifespan(Group([first, second]), first) as engines:
        assert engines == (first, second)
        assert statistics(first).connects == 2
        assert statistics(second).connects == 1
    await wait_for_async(
        lambda: _none_left(database, app_name), what="every backend to close", within=5
    )


async def _none_left(database: TestDatabase, app_name: str) -> bool:
    return await backend_count(database, app_name) == 0


async def test_closed_port_fails_start_up_within_warm_timeout_naming_host_port_database(
    make_engine: EngineFactory,
) -> None:
    port = free_port()
    engine = make_engine(f"postgresql+asyncpg://app:s3cret-pw@127.0.0.1:{port}/orders")
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as caught:
        async with pool_lifespan(engine, warm_timeout=1.0):
            pytest.fail("the body must not run")
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 2.0
    message = str(caught.value)
    assert f"127.0.0.1:{port}/orders" in message
    assert "warm_timeout=1 s" in message
    assert "ConnectionRefusedError" in message or "Connect call failed" in message
    assert "s3cret-pw" not in message
    assert isinstance(caught.value, ConnectionError)


async def test_wrong_password_fails_start_up_at_once_with_the_server_reason(
    make_engine: EngineFactory, password_database: PasswordServer
) -> None:
    engine = make_engine(password_database.url("wrong-pass-91x"))
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as caught:
        async with pool_lifespan(engine, warm_timeout=3.0):
            pytest.fail("the body must not run")
    assert time.monotonic() - started < 3.0 + 1.0
    message = str(caught.value)
    assert f"127.0.0.1:{password_database.port}/postgres" in message
    assert "password authentication failed" in message
    assert "wrong-pass-91x" not in message
    assert PASSWORD not in message
    assert "wrong-pass-91x" not in repr(caught.value.__cause__)


async def test_right_password_on_the_same_server_warms(
    make_engine: EngineFactory, password_database: PasswordServer
) -> None:
    engine = make_engine(password_database.url(PASSWORD), pool_size=2)
    async with pool_lifespan(engine, warm_timeout=3.0):
        assert statistics(engine).idle == 2


async def test_failed_start_up_closes_what_the_healthy_engines_opened(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    healthy = make_engine(name="healthy", pool_size=3)
    down = make_engine(f"postgresql+asyncpg://app@127.0.0.1:{free_port()}/x", name="down")
    with pytest.raises(DatabaseUnavailableError, match="'down'"):
        async with pool_lifespan(healthy, down, warm_timeout=0.5):
            pytest.fail("the body must not run")
    assert statistics(healthy).size == 0
    await wait_for_async(
        lambda: _none_left(database, app_name), what="healthy's backends to close", within=5
    )


async def test_shutdown_refuses_new_checkouts_and_lets_in_flight_work_finish(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=2)
    release = asyncio.Event()
    holding = asyncio.Event()

    async def request() -> int:
        async with engine.connect() as conn:
            holding.set()
            await release.wait()
            return int((await conn.execute(text("SELECT 7"))).scalar_one())

    lifespan = pool_lifespan(engine, drain_timeout=10.0)
    await lifespan.__aenter__()
    in_flight = asyncio.create_task(request())
    await holding.wait()
    stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
    await wait_until(lambda: pool_of(engine).state.closed, what="shutdown to start")
    with pytest.raises(PoolClosedError, match="is closed"):
        async with engine.connect():
            pass
    assert not stopping.done()
    release.set()
    assert await in_flight == 7
    await asyncio.wait_for(stopping, 5)
    assert statistics(engine).size == 0
    await wait_for_async(
        lambda: _none_left(database, app_name), what="every backend to close", within=5
    )


async def test_stragglers_are_terminated_after_drain_timeout(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=2)
    holding = asyncio.Event()
    release = asyncio.Event()

    async def stuck_request() -> None:
        async with engine.connect() as conn:
            holding.set()
            await release.wait()
            await conn.execute(text("SELECT 1"))

    task = asyncio.create_task(stuck_request())
    async with pool_lifespan(engine, drain_timeout=0.3):
        await holding.wait()
        started = time.monotonic()
    assert time.monotonic() - started < 2.0
    await wait_for_async(
        lambda: _none_left(database, app_name), what="the straggler's backend to end", within=5
    )
    release.set()
    with pytest.raises(PoolClosedError, match="shut down"):
        await task
    assert statistics(engine).checked_out == 0


async def test_a_drained_stragglers_holder_gets_a_clear_error_naming_the_drain(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=1)
    holding = asyncio.Event()
    release = asyncio.Event()
    errors: list[BaseException] = []

    async def stuck_request() -> None:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))  # inside a transaction now
                holding.set()
                await release.wait()
        except BaseException as exc:  # what the holder sees on its way out
            errors.append(exc)

    async with pool_lifespan(engine, drain_timeout=0.2):
        task = asyncio.create_task(stuck_request())
        await holding.wait()
    release.set()
    await task
    assert len(errors) == 1, errors
    (error,) = errors
    assert isinstance(error, PoolClosedError)
    assert app_name in str(error) and "shut down" in str(error)
    assert "drain_timeout" in str(error)
    assert statistics(engine).checked_out == 0


async def test_a_straggler_mid_statement_is_stopped_on_the_server_before_the_lifespan_ends(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    running = asyncio.Event()

    async def slow_request() -> None:
        async with engine.connect() as conn:
            running.set()
            await conn.execute(text("SELECT pg_sleep(30)"))

    async with pool_lifespan(engine, drain_timeout=0.3):
        task = asyncio.create_task(slow_request())
        await running.wait()
        await wait_for_async(lambda: database.any_sleeping(app_name), what="pg_sleep to run")
        started = time.monotonic()
    # The drain cancelled the statement on the server, and waited for it.
    assert time.monotonic() - started < 2.0
    assert await database.sleeping(app_name) == 0
    with pytest.raises(PoolClosedError, match="shut down"):
        await task
    assert statistics(engine).checked_out == 0


async def test_a_cancelled_drain_logs_how_long_it_waited_not_drain_timeout(
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(pool_size=2)
    holding = asyncio.Event()
    release = asyncio.Event()

    async def stuck_request() -> None:
        async with engine.connect() as conn:
            holding.set()
            await release.wait()
            await conn.execute(text("SELECT 1"))

    lifespan = pool_lifespan(engine, drain_timeout=5)
    await lifespan.__aenter__()
    request = asyncio.create_task(stuck_request())
    await holding.wait()
    stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
    await wait_until(lambda: pool_of(engine).state.closed, what="the drain to start")
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    (warning,) = [m for r in caplog.records if "still checked out" in (m := r.getMessage())]
    assert "drain_timeout" not in warning
    assert "1 connections still checked out when the shutdown was cancelled" in warning
    await wait_for_async(
        lambda: _none_left(database, app_name), what="the straggler's backend to end", within=5
    )
    release.set()
    with pytest.raises(PoolClosedError, match="shut down"):
        await request
    assert statistics(engine).checked_out == 0


async def test_shutdown_fails_queued_checkouts_instead_of_serving_them_late(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=10)
    lifespan = pool_lifespan(engine, drain_timeout=5)
    await lifespan.__aenter__()
    holder = await engine.connect()
    await holder.execute(text("SELECT 1"))

    async def queued() -> None:
        async with engine.connect():
            pass

    waiter = asyncio.create_task(queued())
    await wait_until(lambda: statistics(engine).waiting == 1, what="a queued checkout")
    shutdown = asyncio.create_task(lifespan.__aexit__(None, None, None))
    with pytest.raises(PoolClosedError):
        await asyncio.wait_for(waiter, 2)  # at once, not after the holder is done
    await holder.close()  # in-flight work still finishes within drain_timeout
    await asyncio.wait_for(shutdown, 5)
    stats = statistics(engine)
    assert (stats.connects, stats.checked_out, stats.waiting) == (1, 0, 0)


async def test_lifespan_can_be_entered_again_after_it_ended(make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=1)
    async with pool_lifespan(engine):
        pass
    async with pool_lifespan(engine):
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1


async def test_nested_lifespan_keeps_the_outer_one_open(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=2)
    async with pool_lifespan(engine):
        async with pool_lifespan(engine):
            assert statistics(engine).connects == 2  # warmed once, by the outer one
        await engine.dispose()  # a new pool object: the count is the engine's, not the pool's
        async with pool_lifespan(engine):
            pass
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        assert await backend_count(database, app_name) == 1
    assert statistics(engine).size == 0
    with pytest.raises(PoolClosedError):
        async with engine.connect():
            pass
    await wait_for_async(
        lambda: _none_left(database, app_name), what="every backend to close", within=5
    )


async def test_something_that_is_neither_engine_nor_group_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="engines must be an AsyncEngine or an object"):
        async with pool_lifespan(object()):
            pytest.fail("the body must not run")
