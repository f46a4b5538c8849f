"""The connection budget's suggested sizes are settings asyncpool accepts (no server needed)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from asyncpool import PoolConfig
from asyncpool.budget import EngineBudget, ServerBudget, _with_suggestions


def server(*engines: EngineBudget, processes: int, max_connections: int = 20) -> ServerBudget:
    return ServerBudget(
        server="127.0.0.1:5432",
        max_connections=max_connections,
        superuser_reserved_connections=3,
        reserved_connections=2,
        in_use_by_others=1,
        reserve=0,
        processes=processes,
        engines=engines,
    )


def pooled(name: str, pool_size: int, max_overflow: int) -> EngineBudget:
    return EngineBudget(name, "primary", pool_size, max_overflow, pool_size, max_overflow)


def analytics(name: str, limit: int) -> EngineBudget:
    return EngineBudget(name, "analytics", 0, limit, 0, limit)


def test_an_analytics_engine_is_suggested_an_analytics_limit_not_pool_size_0() -> None:
    budget = _with_suggestions(
        server(pooled("orders-primary", 10, 0), analytics("orders-analytics", 2), processes=4)
    )
    text = budget.explain()
    assert "pool_size=0" not in text
    assert "orders-primary pool_size=" in text
    assert "orders-analytics analytics_limit=" in text
    primary, extra = budget.engines
    assert extra.suggested_settings == {"analytics_limit": 1}
    PoolConfig(**primary.suggested_settings)  # accepted


@given(
    sizes=st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=4
    ).filter(lambda xs: all(p + o > 0 for p, o in xs)),
    processes=st.integers(1, 64),
    max_connections=st.integers(10, 500),
)
def test_every_printed_suggestion_is_a_valid_setting(
    sizes: list[tuple[int, int]], processes: int, max_connections: int
) -> None:
    engines = [
        analytics(f"e{i}", o) if p == 0 else pooled(f"e{i}", p, o) for i, (p, o) in enumerate(sizes)
    ]
    budget = _with_suggestions(
        server(*engines, processes=processes, max_connections=max_connections)
    )
    for engine in budget.engines:
        settings = engine.suggested_settings
        if "analytics_limit" in settings:
            assert settings["analytics_limit"] >= 1
        else:
            PoolConfig(**settings)  # raises ConfigurationError when refused
    for value in re.findall(r"pool_size=(\d+)", budget.explain()):
        assert int(value) >= 1
