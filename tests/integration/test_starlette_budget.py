"""create_lifespan(budget=...): the start-up budget check for Starlette and FastAPI apps."""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette

from asyncpool import BudgetExceededError, ConfigurationError
from asyncpool.starlette import STATE_KEY, create_lifespan
from tests.fix_db import EngineFactory

#: More processes than any test server's max_connections lets a 1-connection pool serve.
TOO_MANY_PROCESSES = 100_000


async def test_create_lifespan_with_budget_enforce_refuses_to_start_when_the_fleet_does_not_fit(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    lifespan = create_lifespan(engine, budget="enforce", processes=TOO_MANY_PROCESSES)
    with pytest.raises(BudgetExceededError, match="too many"):
        async with lifespan(Starlette()):
            pytest.fail("started although the budget does not fit")


async def test_create_lifespan_with_budget_warn_logs_the_arithmetic_and_starts(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    lifespan = create_lifespan(engine, budget="warn", processes=TOO_MANY_PROCESSES, warm=False)
    with caplog.at_level(logging.WARNING, logger="asyncpool.budget"):
        async with lifespan(Starlette()) as state:
            assert list(state[STATE_KEY].values()) == [engine]
    (record,) = [r for r in caplog.records if r.name == "asyncpool.budget"]
    assert f"{TOO_MANY_PROCESSES} processes" in record.getMessage()


async def test_create_lifespan_with_a_budget_that_fits_starts_quietly(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    with caplog.at_level(logging.WARNING, logger="asyncpool.budget"):
        async with create_lifespan(engine, budget="enforce", processes=1)(Starlette()):
            pass
    assert not [r for r in caplog.records if r.name == "asyncpool.budget"]


def test_create_lifespan_checks_budget_and_processes_when_called(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    with pytest.raises(ConfigurationError, match="budget"):
        create_lifespan(engine, budget="loud")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="processes"):
        create_lifespan(engine, budget="warn", processes=0)
