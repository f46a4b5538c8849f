"""Rules that need no server: which statements need the primary; the budget arithmetic."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql

from asyncpool import ConfigurationError, EngineGroup, PoolConfig, create_pooled_engine
from asyncpool.budget import EngineBudget, ServerBudget, _with_suggestions, processes_from_env
from asyncpool.routing import create_analytics_engine, statement_needs_primary

URL = "postgresql+asyncpg://app:s3cret@127.0.0.1:5432/app"
items = Table("items", MetaData(), Column("id", Integer, primary_key=True))
DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    "statement",
    [
        insert(items).values(id=1),
        update(items).values(id=2),
        delete(items),
        select(items).with_for_update(),
        select(items).with_for_update(read=True),
        select(items).with_for_update(key_share=True),
        text("SELECT * FROM items FOR UPDATE SKIP LOCKED"),
        text("select nextval('items_id_seq')"),
        text("WITH moved AS (DELETE FROM items RETURNING id) SELECT * FROM moved"),
        text("CREATE INDEX ON items (id)"),
        text("SELECT pg_advisory_xact_lock(1)"),
        text("VACUUM items"),
    ],
)
def test_writes_and_locking_reads_need_the_primary(statement: object) -> None:
    assert statement_needs_primary(statement, DIALECT)


@pytest.mark.parametrize(
    "statement",
    [
        select(items).where(items.c.id == 1),
        select(func.count()).select_from(items),
        select(items).union(select(items)),
        text("  SELECT id FROM items WHERE id = :id"),
        text("with x as (select 1) select * from x"),
        text("SHOW server_version"),
        None,
    ],
)
def test_plain_reads_may_go_to_a_replica(statement: object) -> None:
    assert not statement_needs_primary(statement, DIALECT)


def test_a_group_lists_its_engines_with_roles_names_and_sizes() -> None:
    group = EngineGroup.create(
        URL,
        replicas=[URL, URL],
        analytics=URL,
        name="shop",
        config=PoolConfig(pool_size=4, max_overflow=2),
        replica_config=PoolConfig(pool_size=3, max_overflow=0),
        analytics_limit=5,
    )
    roles = [(m.role, m.name, m.pool_size, m.max_overflow) for m in group.members]
    assert roles == [
        ("primary", "shop-primary", 4, 2),
        ("replica", "shop-replica-1", 3, 0),
        ("replica", "shop-replica-2", 3, 0),
        ("analytics", "shop-analytics", 0, 5),
    ]
    assert group.engines == tuple(m.engine for m in group.members)
    assert "s3cret" not in repr(group)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("sticky_window", -1),
        ("retry_interval", 0),
        ("analytics_limit", 0),
        ("analytics_limit", True),
    ],
)
def test_a_group_refuses_bad_settings(option: str, value: object) -> None:
    engine = create_pooled_engine(URL)
    with pytest.raises(ConfigurationError, match=option):
        EngineGroup(engine, **{option: value})  # type: ignore[arg-type]


def test_a_group_refuses_the_same_engine_twice() -> None:
    engine = create_pooled_engine(URL)
    with pytest.raises(ConfigurationError):
        EngineGroup(engine, [engine])


async def test_an_unknown_route_is_refused() -> None:
    group = EngineGroup(create_pooled_engine(URL))
    with pytest.raises(ConfigurationError, match="route"):
        async with group.session(route="replica"):  # type: ignore[arg-type]
            pass


def test_the_analytics_engine_has_no_pool_but_the_same_connect_settings() -> None:
    engine = create_analytics_engine(URL, PoolConfig(name="reports", pooler="pgbouncer"))
    assert type(engine.sync_engine.pool).__name__ == "NullPool"
    assert engine.sync_engine.pool.logging_name == "reports"


def _server(
    available_parts: tuple[int, int, int, int], engines: list[EngineBudget]
) -> ServerBudget:
    max_connections, superuser, reserved, others = available_parts
    return ServerBudget(
        "db:5432", max_connections, superuser, reserved, others, 0, 4, tuple(engines)
    )


def test_suggested_sizes_fit_and_keep_the_proportions() -> None:
    engines = [
        EngineBudget("primary", "primary", 20, 10, 20, 10),
        EngineBudget("replica", "replica", 10, 0, 10, 0),
        EngineBudget("analytics", "analytics", 0, 2, 0, 2),
    ]
    budget = _with_suggestions(_server((100, 3, 0, 5), engines))
    assert budget.available == 92 and budget.would_open == 4 * 42
    suggested = [(e.suggested_pool_size, e.suggested_max_overflow) for e in budget.engines]
    assert suggested == [(11, 5), (6, 0), (0, 1)]  # 4 x 23 = 92: all of it
    assert budget.suggestion_fits
    assert 4 * sum(e.suggested_max_connections for e in budget.engines) <= 92


def test_a_budget_that_cannot_fit_even_one_connection_says_so() -> None:
    engines = [EngineBudget("a", "primary", 5, 0, 5, 0), EngineBudget("b", "replica", 5, 0, 5, 0)]
    budget = _with_suggestions(_server((10, 3, 0, 0), engines))  # 7 available, 4 x 2 needed
    assert not budget.fits and not budget.suggestion_fits
    assert "even 1 connection per engine and process does not fit" in budget.explain()


def test_process_count_comes_from_the_environment() -> None:
    assert processes_from_env({}) == 1
    assert processes_from_env({"WEB_CONCURRENCY": "4"}) == 4
    assert processes_from_env({"ASYNCPOOL_PROCESSES": "6", "WEB_CONCURRENCY": "4"}) == 6
    with pytest.raises(ConfigurationError, match="WEB_CONCURRENCY"):
        processes_from_env({"WEB_CONCURRENCY": "four"})
    with pytest.raises(ConfigurationError, match="ASYNCPOOL_PROCESSES"):
        processes_from_env({"ASYNCPOOL_PROCESSES": "0"})
