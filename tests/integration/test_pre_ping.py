"""Bounded pre-ping: dead connections are replaced unseen; recent ones are not pinged."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from asyncpool import statistics
from asyncpool._drivers import ConnectionState
from asyncpool.engine import pool_of
from tests.fix_db import EngineFactory, TestDatabase, wait_until


async def open_idle_connections(engine: AsyncEngine, count: int) -> set[int]:
    """Check out ``count`` connections at once, note their backend pids, return them."""
    conns = [await engine.connect() for _ in range(count)]
    pids = {(await c.execute(text("SELECT pg_backend_pid()"))).scalar_one() for c in conns}
    for conn in conns:
        await conn.close()
    return pids


async def test_pre_ping_replaces_terminated_connections_without_an_error(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=3, max_overflow=0, pre_ping_skip_window=0)
    old_pids = await open_idle_connections(engine, 3)
    assert await database.terminate(app_name) == 3

    async def query() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())

    new_pids = set(await asyncio.gather(query(), query(), query()))
    assert not new_pids & old_pids
    stats = statistics(engine)
    assert stats.pre_ping_failures == 3
    assert stats.invalidations == 3
    assert stats.connects == 6
    assert stats.checked_out == 0


async def test_pre_ping_is_skipped_inside_the_skip_window(make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pre_ping_skip_window=60)
    for _ in range(5):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    assert statistics(engine).pre_pings == 0
    pinging = make_engine(pool_size=1, max_overflow=0, pre_ping_skip_window=0, name="pinging")
    for _ in range(5):
        async with pinging.connect() as conn:
            await conn.execute(text("SELECT 1"))
    assert statistics(pinging).pre_pings == 4  # every reuse; the first checkout was fresh


async def test_a_connection_seen_closed_is_replaced_even_inside_the_skip_window(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pre_ping_skip_window=60)
    await open_idle_connections(engine, 1)
    await database.terminate(app_name)
    (idle,) = pool_of(engine)._idle  # the driver notices the server's goodbye
    driver = pool_of(engine).driver
    await wait_until(
        lambda: (
            driver.state(idle.dbapi_connection.driver_connection)
            in (ConnectionState.CLOSED, ConnectionState.BROKEN)
        ),
        what="the driver to see EOF",
    )
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    stats = statistics(engine)
    assert (stats.pre_ping_failures, stats.invalidations) == (1, 1)


async def test_a_backend_killed_while_checked_out_fails_only_that_query(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    # No pre-ping can help a connection that dies while lent out: the query
    # finds it, the connection is invalidated, and the next checkout is fresh.
    engine = make_engine(pool_size=1, max_overflow=0, pre_ping_skip_window=60)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await database.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(sa_exc.DBAPIError):
            await conn.execute(text("SELECT 1"))
    assert statistics(engine).pre_ping_failures == 0
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1


async def test_pre_ping_uses_no_transaction_and_no_prepared_statement(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pre_ping_skip_window=0)
    count_prepared = text("SELECT count(*) FROM pg_prepared_statements")
    async with engine.connect() as conn:
        before = (await conn.execute(count_prepared)).scalar()
    conn = await engine.connect()  # pinged here, before any statement of ours
    try:
        (row,) = await database.fetch(
            "SELECT state, xact_start FROM pg_stat_activity WHERE application_name = $1",
            app_name,
        )
        assert row["state"] == "idle" and row["xact_start"] is None
        after = (await conn.execute(count_prepared)).scalar()
    finally:
        await conn.close()
    assert after == before
    stats = statistics(engine)
    assert (stats.pre_pings, stats.pre_ping_failures) == (1, 0)


async def test_pre_ping_off_never_pings(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pre_ping=False)
    await open_idle_connections(engine, 1)
    await database.terminate(app_name)
    with pytest.raises(sa_exc.DBAPIError):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    assert statistics(engine).pre_ping_failures == 0
