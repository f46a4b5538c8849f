"""The pool's state stays right on every path: dispose, recreate, statistics.

Each test here reproduces a defect of issue 13 against a real PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from asyncpool import statistics
from asyncpool._pool import FairAsyncPool
from asyncpool.engine import pool_of
from tests.fix_db import EngineFactory, TestDatabase, wait_until


async def backend_pid(conn: AsyncConnection) -> int:
    return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def test_pool_dispose_closes_the_idle_connections_and_keeps_pooling(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0)
    async with engine.connect() as conn:
        first = await backend_pid(conn)
    pool_of(engine).dispose()  # SQLAlchemy's Pool.dispose(): the idle ones only
    assert statistics(engine).idle == 0
    pids = set()
    for _ in range(5):
        async with engine.connect() as conn:
            pids.add(await backend_pid(conn))
    assert len(pids) == 1 and first not in pids  # one new connection, pooled again
    stats = statistics(engine)
    assert (stats.checked_out, stats.idle, stats.connects) == (0, 1, 2)


@pytest.mark.asyncpg_only  # psycopg: passes asyncpg's server_settings in connect_args
async def test_the_pool_class_used_directly_keeps_pool_pre_ping_through_recreate(
    database: TestDatabase, app_name: str
) -> None:
    engines = {
        ping: create_async_engine(
            database.url,
            poolclass=FairAsyncPool,
            pool_pre_ping=ping,
            pool_size=1,
            max_overflow=0,
            connect_args={"server_settings": {"application_name": app_name}},
        )
        for ping in (True, False)
    }
    try:
        for ping, engine in engines.items():
            assert pool_of(engine).state.config.pre_ping is ping
            await engine.dispose()  # recreate()
            pool = pool_of(engine)
            assert pool.state.config.pre_ping is ping
            assert pool._pre_ping is False  # never SQLAlchemy's ping on top of ours
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        for engine in engines.values():
            await engine.dispose()


@pytest.mark.asyncpg_only  # psycopg: uses asyncpg's Connection.get_server_pid()
async def test_a_connection_given_back_closed_is_not_counted_as_idle(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=3, max_overflow=0)
    # Autocommit: no rollback at give-back to notice the closed connection.
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    held = [await autocommit.connect() for _ in range(3)]
    for conn in held:
        await conn.execute(text("SELECT 1"))
    victim = held[0]
    raw: Any = (await victim.get_raw_connection()).driver_connection
    admin = await asyncpg.connect(database.dsn)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", raw.get_server_pid())
    finally:
        await admin.close()
    await wait_until(raw.is_closed, what="the client to see the connection closed")
    for conn in held:
        await conn.close()
    stats = statistics(engine)
    backends = await database.backends(app_name)
    assert (stats.size, stats.idle, stats.checked_out) == (2, 2, 0)
    assert len(backends) == 2
    assert pool_of(engine).state.counters.invalidations_by_reason["returned_closed"] == 1


async def test_statistics_of_a_pool_without_overflow_limit_report_no_maximum(
    database: TestDatabase,
) -> None:
    engine = create_async_engine(
        database.url, poolclass=FairAsyncPool, pool_size=1, max_overflow=-1
    )
    try:
        held = [await engine.connect() for _ in range(3)]
        for conn in held:
            await conn.execute(text("SELECT 1"))
        stats = statistics(engine)
        assert stats.checked_out == 3 and stats.max_size is None
        for conn in held:
            await conn.close()
    finally:
        await engine.dispose()


@pytest.mark.parametrize("max_overflow", [0, 4])
async def test_statistics_max_size_is_pool_size_plus_max_overflow(
    make_engine: EngineFactory, max_overflow: int
) -> None:
    engine = make_engine(pool_size=2, max_overflow=max_overflow)
    assert statistics(engine).max_size == 2 + max_overflow
