"""Property tests: every public function checks its arguments like ``PoolConfig``.

For ``EngineGroup`` and ``EngineGroup.create``, ``pool_lifespan``,
``create_lifespan``, ``Sessions``, ``health_endpoint``, ``retry`` and
``connection_budget``, hypothesis spoils one argument at a time (a wrong
type, a string where a list belongs, infinity, NaN, a bool for a number, an
unknown option) and leaves the others valid. A spoilt call must raise
``ConfigurationError`` naming that argument and the valid range, when called
(before a lifespan is entered, before any connection); an unspoilt one must
not raise. The engines point at a closed port, so a connection attempt would
show up as a different error. No password ever appears in a message.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import asyncpool
from asyncpool import (
    ConfigurationError,
    EngineGroup,
    PoolConfig,
    connection_budget,
    create_pooled_engine,
    pool_lifespan,
)
from asyncpool.routing import create_analytics_engine
from asyncpool.starlette import Sessions, create_lifespan, health_endpoint

PASSWORD: Final = "s3cret-pw"
#: Nothing listens on port 1: a connection attempt fails with an OSError, not a ConfigurationError.
URL: Final = f"postgresql+asyncpg://app:{PASSWORD}@127.0.0.1:1/test"

PROPERTIES = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the checkout
    suppress_health_check=[HealthCheck.too_slow],
)

ENGINE: Final = create_pooled_engine(URL, PoolConfig(name="props", pool_size=1), telemetry=False)
OTHER: Final = create_pooled_engine(URL, PoolConfig(name="props-2", pool_size=1), telemetry=False)
ANALYTICS: Final = create_analytics_engine(URL, PoolConfig(name="props-analytics"))


async def _coroutine() -> None:
    pass


# ------------------------------------------------------------ values

NOT_NUMBERS: Final = [None, "1", b"1", True, False, [1], {"a": 1}, object()]
positive_seconds = st.floats(0.001, 1e6) | st.integers(1, 10_000)
non_negative_seconds = st.floats(0.0, 1e6) | st.integers(0, 10_000)
bad_positive_seconds = st.sampled_from(
    [0, 0.0, -0.0, -1, math.inf, -math.inf, math.nan, *NOT_NUMBERS]
) | st.floats(max_value=0.0)
bad_non_negative_seconds = st.sampled_from(
    [-1, -1e-9, math.inf, math.nan, *NOT_NUMBERS]
) | st.floats(max_value=-1e-300)


def bad_int(low: int, high: int | None = None, *, none_ok: bool = False) -> st.SearchStrategy[Any]:
    odd = [low - 1, float(low), low + 0.5, True, "2", math.inf, math.nan, [low], object()]
    if high is not None:
        odd.append(high + 1)
    if not none_ok:
        odd.append(None)
    return st.sampled_from(odd) | st.integers(max_value=low - 1)


not_engines = st.sampled_from([None, 42, URL, b"x", object(), [ENGINE], {"a": ENGINE}])
not_engines_nor_none = not_engines.filter(lambda value: value is not None)
not_mappings = st.sampled_from([[("echo", True)], "echo=True", 5, object(), {1: 2}])
not_configs = st.sampled_from([{}, {"pool_size": 5}, "pool_size=5", 5, object()])
not_url_lists = st.sampled_from(
    [URL, b"x", 5, [5], [None], [ENGINE], ["mysql://u:pw@h/db"], ["://"]]
)
not_engine_lists = st.sampled_from([ENGINE, "x", 5, [5], [URL], [None], object()])
bad_names = st.sampled_from(["", "x" * 60, "caf\u00e9", "a\nb", 5, None, b"name"])


class Argument:
    """One argument of a function: how to draw a valid value and a spoilt one."""

    def __init__(
        self, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], setting: str = ""
    ) -> None:
        self.good, self.bad, self.setting = good, bad, setting


def draw_arguments(
    draw: st.DrawFn, arguments: dict[str, Argument]
) -> tuple[dict[str, Any], str | None]:
    """Valid values for all; maybe one spoilt (its name returned, else None)."""
    spoilt = draw(st.sampled_from([None, *arguments]))
    values = {}
    for name, argument in arguments.items():
        values[name] = draw(argument.bad if name == spoilt else argument.good)
    return values, spoilt


def assert_names(raised: pytest.ExceptionInfo[ConfigurationError], setting: str) -> None:
    error = raised.value
    assert error.setting == setting or error.setting.startswith(setting + "[")
    message = str(error)
    assert message.startswith(f"{error.setting} must be ")
    assert PASSWORD not in message and PASSWORD not in repr(error.value)


def check(call: Callable[[], object], spoilt: str | None, setting: str | None = None) -> Any:
    if spoilt is None:
        return call()
    with pytest.raises(ConfigurationError) as raised:
        call()
    assert_names(raised, setting or spoilt)
    return None


# ------------------------------------------------------------ EngineGroup

GROUP: Final = {
    "replicas": Argument(st.sampled_from([(), [OTHER], (OTHER,)]), not_engine_lists),
    "analytics": Argument(st.sampled_from([None, ANALYTICS]), not_engines_nor_none),
    "sticky_window": Argument(non_negative_seconds, bad_non_negative_seconds),
    "retry_interval": Argument(positive_seconds, bad_positive_seconds),
    "analytics_limit": Argument(st.integers(1, 1000), bad_int(1)),
    "session_options": Argument(st.sampled_from([None, {}, {"autoflush": False}]), not_mappings),
}


@PROPERTIES
@given(data=st.data())
def test_engine_group_names_a_bad_argument(data: st.DataObject) -> None:
    values, spoilt = draw_arguments(data.draw, GROUP)
    check(lambda: EngineGroup(ENGINE, **values), spoilt)


@PROPERTIES
@given(primary=not_engines)
def test_engine_group_names_a_primary_that_is_not_an_engine(primary: object) -> None:
    check(lambda: EngineGroup(primary), "primary")  # type: ignore[arg-type]


CREATE: Final = {
    "replicas": Argument(st.sampled_from([(), [URL], (URL, URL)]), not_url_lists),
    "analytics": Argument(st.sampled_from([None, URL]), st.sampled_from([5, ENGINE, "mysql://x"])),
    "name": Argument(st.sampled_from(["db", "orders", "x" * 50]), bad_names),
    "config": Argument(st.sampled_from([None, PoolConfig(pool_size=2)]), not_configs),
    "replica_config": Argument(st.sampled_from([None, PoolConfig(pool_size=1)]), not_configs),
    "analytics_config": Argument(st.sampled_from([None, PoolConfig()]), not_configs),
    "engine_options": Argument(st.sampled_from([None, {}, {"echo": False}]), not_mappings),
    "sticky_window": Argument(non_negative_seconds, bad_non_negative_seconds),
    "retry_interval": Argument(positive_seconds, bad_positive_seconds),
    "analytics_limit": Argument(st.integers(1, 1000), bad_int(1)),
    "session_options": Argument(st.sampled_from([None, {"autoflush": False}]), not_mappings),
}


@PROPERTIES
@given(data=st.data())
def test_engine_group_create_names_a_bad_argument_before_creating_engines(
    data: st.DataObject,
) -> None:
    values, spoilt = draw_arguments(data.draw, CREATE)
    group = check(lambda: EngineGroup.create(URL, **values), spoilt)
    if group is not None:
        for engine in group.engines:
            engine.sync_engine.dispose(close=False)


def test_engine_group_create_names_replicas_given_as_one_string() -> None:
    with pytest.raises(ConfigurationError) as raised:
        EngineGroup.create(URL, replicas=URL)
    assert_names(raised, "replicas")
    assert "a list or tuple of database URLs" in str(raised.value)


def test_engine_group_create_names_a_config_given_as_a_dict() -> None:
    with pytest.raises(ConfigurationError) as raised:
        EngineGroup.create(URL, config={"pool_size": 5})  # type: ignore[arg-type]
    assert_names(raised, "config")


def test_engine_group_create_names_an_unknown_group_option() -> None:
    with pytest.raises(ConfigurationError) as raised:
        EngineGroup.create(URL, sticky_windw=1.0)
    assert_names(raised, "sticky_windw")


# ------------------------------------------------------------ lifespans

LIFESPAN: Final = {
    "warm": Argument(st.booleans(), st.sampled_from([1, 0, "yes", None, []])),
    "warm_timeout": Argument(positive_seconds, bad_positive_seconds),
    "drain_timeout": Argument(non_negative_seconds, bad_non_negative_seconds),
    "budget": Argument(
        st.sampled_from([None, "warn", "enforce"]),
        st.sampled_from(["warning", "", "WARN", 1, True, ["warn"]]),
    ),
    "processes": Argument(st.none() | st.integers(1, 10_000), bad_int(1, none_ok=True)),
}


@PROPERTIES
@given(data=st.data())
def test_pool_lifespan_names_a_bad_argument_when_called(data: st.DataObject) -> None:
    values, spoilt = draw_arguments(data.draw, LIFESPAN)
    check(lambda: pool_lifespan(ENGINE, **values), spoilt)  # not entered: no pool touched


@PROPERTIES
@given(engine=not_engines)
def test_pool_lifespan_names_an_engine_that_is_not_one(engine: object) -> None:
    check(lambda: pool_lifespan(ENGINE, engine), "engines")


async def test_a_spoilt_lifespan_opens_no_connection_and_leaves_the_pool_untouched() -> None:
    with pytest.raises(ConfigurationError) as raised:
        async with pool_lifespan(ENGINE, warm_timeout=math.inf):
            pytest.fail("the body must not run")
    assert_names(raised, "warm_timeout")
    assert asyncpool.statistics(ENGINE).size == 0


@PROPERTIES
@given(data=st.data())
def test_create_lifespan_names_a_bad_argument_when_created(data: st.DataObject) -> None:
    arguments = {k: LIFESPAN[k] for k in ("warm", "warm_timeout", "drain_timeout")}
    arguments["lifespan"] = Argument(st.sampled_from([None]), st.sampled_from([5, "app"]))
    values, spoilt = draw_arguments(data.draw, arguments)
    check(lambda: create_lifespan(ENGINE, **values), spoilt)


# ------------------------------------------------------------ starlette

SESSION_OPTIONS: Final = st.sampled_from(
    [{}, {"expire_on_commit": True}, {"autoflush": False, "info": {"a": 1}}]
)
BAD_SESSION_OPTIONS: Final = st.sampled_from(
    [
        ({"expire_on_comit": False}, "expire_on_comit"),
        ({"autoflush": "no"}, "autoflush"),
        ({"expire_on_commit": 0}, "expire_on_commit"),
        ({"sync_session_class": dict}, "sync_session_class"),
        ({"bogus": 1, "autoflush": True}, "bogus"),
    ]
)


@PROPERTIES
@given(options=SESSION_OPTIONS)
def test_sessions_accept_asyncsession_options(options: dict[str, Any]) -> None:
    Sessions(ENGINE, **options)


@PROPERTIES
@given(case=BAD_SESSION_OPTIONS)
def test_sessions_name_a_bad_option(case: tuple[dict[str, Any], str]) -> None:
    options, setting = case
    check(lambda: Sessions(ENGINE, **options), setting)


@PROPERTIES
@given(bind=not_engines)
def test_sessions_name_a_bind_that_is_neither_engine_nor_sessionmaker(bind: object) -> None:
    check(lambda: Sessions(bind), "bind")  # type: ignore[arg-type]


def test_sessions_name_an_option_given_beside_a_sessionmaker() -> None:
    check(lambda: Sessions(async_sessionmaker(ENGINE), autoflush=False), "autoflush")


@PROPERTIES
@given(data=st.data())
def test_health_endpoint_names_a_bad_timeout_or_saturated_status(data: st.DataObject) -> None:
    values, spoilt = draw_arguments(
        data.draw,
        {
            "timeout": Argument(positive_seconds, bad_positive_seconds),
            "saturated_status": Argument(st.integers(200, 599), bad_int(200, 599)),
        },
    )
    check(lambda: health_endpoint(ENGINE, **values), spoilt)


@PROPERTIES
@given(engine=not_engines)
def test_health_endpoint_names_an_engine_that_is_not_one(engine: object) -> None:
    check(lambda: health_endpoint(engine), "engines")


# ------------------------------------------------------------ retry

RETRY: Final = {
    "attempts": Argument(st.integers(1, 100), bad_int(1, 100)),
    "backoff": Argument(non_negative_seconds, bad_non_negative_seconds),
    "max_backoff": Argument(non_negative_seconds, bad_non_negative_seconds),
    "retry_on": Argument(
        st.sampled_from([lambda exc: True, callable]), st.sampled_from([None, "disconnects", 5])
    ),
}


@PROPERTIES
@given(data=st.data())
def test_retry_names_a_bad_argument(data: st.DataObject) -> None:
    values, spoilt = draw_arguments(data.draw, RETRY)
    check(lambda: asyncpool.retry(**values), spoilt)
    check(lambda: asyncpool.retry(**values)(_coroutine), spoilt)


@PROPERTIES
@given(func=st.sampled_from([42, "f", object()]))
def test_retry_names_a_function_that_is_not_callable(func: object) -> None:
    check(lambda: asyncpool.retry(func), "func")  # type: ignore[call-overload]


# ------------------------------------------------------------ connection budget

BUDGET: Final = {
    "processes": Argument(st.integers(1, 1000), bad_int(1)),
    "reserve": Argument(st.integers(0, 1000), bad_int(0)),
}


@PROPERTIES
@given(data=st.data())
def test_connection_budget_names_a_bad_argument_before_connecting(data: st.DataObject) -> None:
    values, spoilt = draw_arguments(data.draw, BUDGET)
    if spoilt is None:
        return  # a valid call connects: tests/integration/test_budget.py
    with pytest.raises(ConfigurationError) as raised:
        asyncio.run(connection_budget(ENGINE, **values))
    assert_names(raised, spoilt)


@PROPERTIES
@given(engine=not_engines)
def test_connection_budget_names_an_engine_that_is_not_one(engine: object) -> None:
    with pytest.raises(ConfigurationError) as raised:
        asyncio.run(connection_budget(engine, processes=1))
    assert_names(raised, "engines")


def test_every_engine_here_is_unconnected() -> None:
    for engine in (ENGINE, OTHER):
        assert isinstance(engine, AsyncEngine)
        assert asyncpool.statistics(engine).size == 0
