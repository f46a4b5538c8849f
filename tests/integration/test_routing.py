"""EngineGroup against a real streaming replica that lags on purpose (recovery_min_apply_delay)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Column, Integer, MetaData, Table, select, text

import asyncpool
from asyncpool import EngineGroup, PoolConfig
from tests.fix_db import wait_for_async
from tests.fix_proxy import FaultProxy
from tests.fix_replica import ReplicaSet

metadata = MetaData()
items = Table("routing_items", metadata, Column("id", Integer, primary_key=True))

IN_RECOVERY = text("SELECT pg_is_in_recovery()")

GroupFactory = Callable[..., EngineGroup]


@pytest.fixture(scope="module", autouse=True)
def _schema(replica_set: ReplicaSet) -> None:
    async def create() -> None:
        conn = await asyncpg.connect(replica_set.primary.dsn())
        try:
            await conn.execute("CREATE TABLE routing_items (id int PRIMARY KEY)")
        finally:
            await conn.close()
        replica = await asyncpg.connect(replica_set.replica.dsn())
        try:
            exists = "SELECT to_regclass('routing_items') IS NOT NULL"
            await wait_for_async(
                lambda: replica.fetchval(exists), what="the table on the replica", within=10
            )
        finally:
            await replica.close()

    asyncio.run(create())


@pytest.fixture
async def make_group(replica_set: ReplicaSet, app_name: str) -> AsyncIterator[GroupFactory]:
    groups: list[EngineGroup] = []

    def factory(**options: Any) -> EngineGroup:
        options.setdefault("config", PoolConfig(pool_size=2, max_overflow=2, pool_timeout=2))
        group = EngineGroup.create(
            replica_set.primary_url,
            replicas=options.pop("replicas", [replica_set.replica_url]),
            analytics=options.pop("analytics", replica_set.replica_url),
            name=app_name,
            **options,
        )
        groups.append(group)
        return group

    yield factory
    for group in groups:
        await group.dispose()


_ids = iter(range(1, 10**9))


async def in_recovery(group: EngineGroup, route: Any = "read") -> bool:
    async with group.session(route=route) as session:
        return bool(await session.scalar(IN_RECOVERY))


async def insert(group: EngineGroup) -> int:
    new_id = next(_ids)
    async with group.session(route="write") as session:
        await session.execute(items.insert().values(id=new_id))
        await session.commit()
    return new_id


async def test_reads_land_on_the_replica_and_writes_on_the_primary(
    make_group: GroupFactory,
) -> None:
    group = make_group()
    assert [await in_recovery(group) for _ in range(5)] == [True] * 5
    assert await in_recovery(group, "write") is False
    stats = group.statistics()
    assert (stats.replica_reads, stats.replica_fallbacks, stats.sticky_reads) == (5, 0, 0)


async def test_a_read_after_a_write_sees_the_write_every_time(
    make_group: GroupFactory, replica_set: ReplicaSet
) -> None:
    group = make_group(sticky_window=2.0)
    replica = await asyncpg.connect(replica_set.replica.dsn())
    misses_on_replica = 0
    try:
        for _ in range(40):
            new_id = await insert(group)
            async with group.session(route="read") as session:
                found = await session.scalar(select(items.c.id).where(items.c.id == new_id))
            assert found == new_id
            seen = await replica.fetchval("SELECT id FROM routing_items WHERE id = $1", new_id)
            misses_on_replica += seen is None
    finally:
        await replica.close()
    assert misses_on_replica >= 35  # the replica really lags: without routing these fail
    assert group.statistics().sticky_reads == 40


async def test_a_write_in_a_read_session_keeps_the_rest_of_the_session_on_the_primary(
    make_group: GroupFactory,
) -> None:
    group = make_group(sticky_window=0.0)
    async with group.session(route="read") as session:
        assert await session.scalar(IN_RECOVERY) is True
        new_id = next(_ids)
        await session.execute(items.insert().values(id=new_id))  # routed to the primary
        assert await session.scalar(IN_RECOVERY) is False
        assert await session.scalar(select(items.c.id).where(items.c.id == new_id)) == new_id
        await session.commit()
    assert group.statistics().moved_to_primary == 1


async def test_a_request_scope_keeps_reads_on_the_primary_after_a_write(
    make_group: GroupFactory,
) -> None:
    group = make_group(sticky_window=0.0)  # no time window: only the scope counts
    async with group.request_scope():
        assert await in_recovery(group) is True
        new_id = await insert(group)

        async def read_in_another_task() -> Any:
            async with group.session(route="read") as session:
                return await session.scalar(select(items.c.id).where(items.c.id == new_id))

        assert await asyncio.gather(read_in_another_task(), read_in_another_task()) == [
            new_id,
            new_id,
        ]
    assert await in_recovery(group) is True  # a new request starts on the replica


async def test_after_the_sticky_window_reads_return_to_the_replica(
    make_group: GroupFactory,
) -> None:
    group = make_group(sticky_window=0.3)
    await insert(group)
    assert await in_recovery(group) is False
    started = time.monotonic()
    await wait_for_async(lambda: in_recovery(group), what="reads back on the replica", within=3)
    assert time.monotonic() - started >= 0.2


async def test_select_for_update_goes_to_the_primary(make_group: GroupFactory) -> None:
    group = make_group(sticky_window=0.0)
    new_id = await insert(group)
    async with group.session(route="read") as session:
        locked = await session.scalar(
            select(items.c.id).where(items.c.id == new_id).with_for_update()
        )
        assert locked == new_id  # a hot standby refuses FOR UPDATE; the primary has the row
        in_text = text("SELECT id FROM routing_items WHERE id = :id FOR SHARE")
        assert await session.scalar(in_text, {"id": new_id}) == new_id
        await session.commit()
    assert group.statistics().moved_to_primary == 1  # and it stayed there


async def test_analytics_sessions_use_an_unpooled_engine_bounded_by_analytics_limit(
    make_group: GroupFactory, replica_set: ReplicaSet, app_name: str
) -> None:
    group = make_group(analytics_limit=1)
    assert group.analytics is not None
    first_in, release = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    async def analytics(label: str) -> None:
        async with group.session(route="analytics") as session:
            order.append(label)
            await session.scalar(text("SELECT 1"))
            first_in.set()
            await release.wait()

    first = asyncio.create_task(analytics("first"))
    await first_in.wait()
    second = asyncio.create_task(analytics("second"))
    await asyncio.sleep(0)  # let the second one reach the limit
    assert order == ["first"]
    release.set()
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    assert await _backends(replica_set, f"{app_name}-analytics") == []  # NullPool closed them


async def test_a_stopped_replica_is_survived_and_used_again_when_back(
    make_group: GroupFactory, replica_set: ReplicaSet, app_name: str
) -> None:
    pool_timeout, connect_timeout = 1.0, 1.0
    replica_config = PoolConfig(
        pool_size=2, max_overflow=0, pool_timeout=pool_timeout, connect_timeout=connect_timeout
    )
    group = make_group(replica_config=replica_config, retry_interval=0.5, sticky_window=0.0)
    assert await in_recovery(group) is True  # a pooled replica connection exists
    await asyncio.to_thread(replica_set.replica.stop)  # the app's loop keeps running
    try:
        started = time.monotonic()
        assert await in_recovery(group) is False  # no error: served by the primary
        assert time.monotonic() - started < pool_timeout + connect_timeout
        assert all([not await in_recovery(group) for _ in range(20)])
        stats = group.statistics()
        assert stats.replica_fallbacks == 21
        assert stats.replicas_down == (f"{app_name}-replica-1",)
    finally:
        await asyncio.to_thread(replica_set.replica.start)
    await wait_for_async(lambda: in_recovery(group), what="reads back on the replica", within=10)
    assert group.statistics().replicas_down == ()


async def test_a_black_holed_replica_costs_at_most_pool_timeout_plus_connect_timeout(
    make_group: GroupFactory, replica_set: ReplicaSet
) -> None:
    proxy = FaultProxy("127.0.0.1", replica_set.replica.port)
    try:
        replica_config = PoolConfig(
            pool_size=1,
            max_overflow=0,
            pool_timeout=1.0,
            connect_timeout=1.0,
            pre_ping_timeout=0.5,
            pre_ping_skip_window=0.0,
        )
        via_proxy = replica_set.replica.url().replace(
            f":{replica_set.replica.port}/", f":{proxy.port}/"
        )
        group = make_group(replicas=[via_proxy], replica_config=replica_config, retry_interval=60)
        assert await in_recovery(group) is True
        proxy.black_hole()  # packets vanish: no refusal, no reset, only silence
        started = time.monotonic()
        assert await in_recovery(group) is False
        assert time.monotonic() - started < replica_config.pool_timeout + 1.0
        started = time.monotonic()
        assert await in_recovery(group) is False  # known down: not waited for again
        assert time.monotonic() - started < 0.5
        assert group.statistics().replica_fallbacks == 2
    finally:
        proxy.stop()


async def test_pool_lifespan_warms_and_disposes_every_engine_of_a_group(
    make_group: GroupFactory, replica_set: ReplicaSet, app_name: str
) -> None:
    group = make_group(config=PoolConfig(pool_size=2, max_overflow=0))
    async with asyncpool.pool_lifespan(group) as engines:
        assert set(engines) == set(group.engines)
        assert len(await _backends(replica_set, f"{app_name}-primary", primary=True)) == 2
        assert len(await _backends(replica_set, f"{app_name}-replica-1")) == 2
    assert await _backends(replica_set, f"{app_name}-primary", primary=True) == []
    assert await _backends(replica_set, f"{app_name}-replica-1") == []


async def _backends(replica_set: ReplicaSet, name: str, *, primary: bool = False) -> Any:
    server = replica_set.primary if primary else replica_set.replica
    conn = await asyncpg.connect(server.dsn())
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", name
        )
    finally:
        await conn.close()
    return [row["pid"] for row in rows]
