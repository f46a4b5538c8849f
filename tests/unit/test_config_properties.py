"""Property tests: bad input of any shape gives a ConfigurationError, never anything else.

Hypothesis draws settings (valid and invalid values of every type),
environment strings and URLs. Each draw is judged by an oracle written here,
independently of asyncpool/config.py: an invalid input must raise
``ConfigurationError`` naming the setting, a valid one must build an engine
(which opens no connection). Passwords never appear in an error.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from asyncpool import ConfigurationError, PoolConfig, create_pooled_engine
from asyncpool._pgbouncer import ASYNCPG_FOR_PGBOUNCER, asyncpg_version
from asyncpool.config import POOLERS, setting_names
from asyncpool.engine import pool_of

URL: Final = "postgresql+asyncpg://app:s3cret@127.0.0.1:5432/test"
#: The poolers an engine accepts with the installed asyncpg.
POOLERS_HERE: Final = POOLERS if asyncpg_version() >= ASYNCPG_FOR_PGBOUNCER else ()

PROPERTIES = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the checkout
    suppress_health_check=[HealthCheck.too_slow],
)

# ------------------------------------------------------------------ oracle

PRINTABLE_ASCII: Final = "".join(c for c in map(chr, range(32, 127)))


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def seconds(*, zero: bool, optional: bool) -> Any:
    def ok(value: object) -> bool:
        if value is None:
            return optional
        return is_number(value) and math.isfinite(value) and (value >= 0 if zero else value > 0)  # type: ignore[arg-type,operator]

    return ok


def integer(low: int, high: int) -> Any:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def name(*, optional: bool) -> Any:
    def ok(value: object) -> bool:
        if value is None:
            return optional
        return (
            isinstance(value, str)
            and 0 < len(value.encode()) <= 63
            and value.isascii()
            and value.isprintable()
        )

    return ok


def boolean(value: object) -> bool:
    return isinstance(value, bool)


#: setting -> whether a value is valid on its own (min_idle also depends on pool_size).
VALID: Final[dict[str, Any]] = {
    "name": name(optional=True),
    "pool_size": integer(1, 10_000),
    "max_overflow": integer(0, 10_000),
    "pool_timeout": seconds(zero=False, optional=False),
    "pool_recycle": seconds(zero=False, optional=True),
    "pre_ping": boolean,
    "pre_ping_timeout": seconds(zero=False, optional=False),
    "pre_ping_skip_window": seconds(zero=True, optional=False),
    "max_waiting": integer(0, 1_000_000),
    "use_lifo": boolean,
    "connect_timeout": seconds(zero=False, optional=False),
    "command_timeout": seconds(zero=False, optional=True),
    "leak_threshold": seconds(zero=False, optional=True),
    "application_name": name(optional=True),
    "min_idle": lambda v: v is None or integer(0, 10_000)(v),
    "pooler": lambda v: v is None or v in POOLERS,
    "cleanup_timeout": seconds(zero=False, optional=False),
    "client_connection_check_interval": lambda v: (
        v is None or (is_number(v) and math.isfinite(v) and 0.001 <= v <= 2_147_483)
    ),
    "detect_concurrent_use": lambda v: v is None or boolean(v),
    "idle_timeout": seconds(zero=False, optional=True),
    "recycle_jitter": lambda v: is_number(v) and math.isfinite(v) and 0 <= v <= 0.5,
    "keepalive_interval": seconds(zero=False, optional=True),
    "pool_per_loop": boolean,
    "max_loops": integer(1, 1024),
}


def expected_valid(values: dict[str, Any]) -> bool:
    if not all(VALID[key](value) for key, value in values.items()):
        return False
    min_idle = values.get("min_idle")
    return min_idle is None or min_idle <= values.get("pool_size", PoolConfig().pool_size)


# -------------------------------------------------------------- strategies

anything: Final = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-5, 20),
    st.floats(),
    st.floats(0, 100),
    st.text(max_size=8),
)
names: Final = st.one_of(
    st.text(max_size=70),
    st.text(alphabet=PRINTABLE_ASCII, min_size=1, max_size=70),
    st.none(),
    st.integers(),
)
STRATEGIES: Final[dict[str, Any]] = {
    "name": names,
    "application_name": names,
    "pool_size": st.one_of(st.integers(-2, 12), st.integers(9_990, 10_010), anything),
    "max_overflow": st.one_of(st.integers(-2, 12), anything),
    "max_waiting": st.one_of(st.integers(-2, 1_000_002), anything),
    "min_idle": st.one_of(st.integers(-2, 12), anything),
    "pre_ping": anything,
    "use_lifo": anything,
    # pooler="pgbouncer" needs asyncpg >= 0.32 (refused below; its own test).
    "pooler": st.one_of(st.sampled_from([*POOLERS_HERE, "PgBouncer", "pgpool", ""]), anything),
}
settings_values: Final = st.fixed_dictionaries(
    {},
    optional={key: STRATEGIES.get(key, anything) for key in setting_names()},
)


def test_the_oracle_knows_every_setting() -> None:
    assert set(VALID) == set(setting_names())


def build_engine(config: PoolConfig | None = None, url: str = URL) -> AsyncEngine:
    return create_pooled_engine(url, config, telemetry=False)


@PROPERTIES
@given(settings_values)
def test_any_settings_either_build_an_engine_or_raise_configuration_error(
    values: dict[str, Any],
) -> None:
    if not expected_valid(values):
        with pytest.raises(ConfigurationError) as raised:
            PoolConfig(**values)
        assert isinstance(raised.value, ValueError)
        assert raised.value.setting in values
        assert raised.value.setting in str(raised.value)
        return
    config = PoolConfig(**values)
    engine = build_engine(config)
    pool_config = pool_of(engine).state.config
    assert pool_config == config.replace(name=pool_config.name)


# ------------------------------------------------------------- environment

env_values: Final = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["1", "0", "true", "No", "none", "NULL", "", " 5 ", "2.5", "-1", "nan", "inf", "1e309"]
    ),
    st.integers(-5, 20_000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
env_keys: Final = st.one_of(
    st.sampled_from([f"ASYNCPOOL_{key.upper()}" for key in setting_names()]),
    st.sampled_from(["ASYNCPOOL_POOLSIZE", "ASYNCPOOL_pool_size", "ASYNCPOOL_", "OTHER_VAR"]),
)


@PROPERTIES
@given(st.dictionaries(env_keys, env_values, max_size=6))
def test_any_environment_either_builds_an_engine_or_raises_configuration_error(
    environ: dict[str, str],
) -> None:
    try:
        config = PoolConfig.from_env(environ=environ)
    except ConfigurationError as error:
        assert isinstance(error, ValueError)
        named = {key for key in environ if error.setting in (key, key[len("ASYNCPOOL_") :].lower())}
        assert named, f"{error} names none of {sorted(environ)}"
        return
    assert build_engine(config) is not None


def as_env_string(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


round_trip_names: Final = st.text(alphabet=PRINTABLE_ASCII, min_size=1, max_size=63).filter(
    lambda s: s == s.strip() and s.lower() not in {"none", "null"}
)


@PROPERTIES
@given(settings_values, round_trip_names)
def test_valid_settings_survive_the_round_trip_through_the_environment(
    values: dict[str, Any], app_name: str
) -> None:
    values = {k: v for k, v in values.items() if k not in {"name", "application_name"}}
    values["application_name"] = app_name
    if not expected_valid(values) or any(isinstance(v, str) for v in values.values()):
        return  # a string value would not round-trip as that type
    environ = {f"ASYNCPOOL_{key.upper()}": as_env_string(value) for key, value in values.items()}
    assert PoolConfig.from_env(environ=environ) == PoolConfig(**values)


# -------------------------------------------------------------------- URLs

PASSWORD_ALPHABET: Final = string.ascii_letters + string.digits


@PROPERTIES
@given(st.text(max_size=60))
def test_any_url_text_either_builds_an_engine_or_raises_configuration_error(text: str) -> None:
    try:
        build_engine(url=text)
    except ConfigurationError as error:
        assert error.setting == "url"


@PROPERTIES
@given(
    driver=st.sampled_from(
        [
            "postgresql+asyncpg",
            "postgresql",
            "postgres",
            "postgresql+psycopg",
            "postgresql+psycopg2",
            "mysql+aiomysql",
            "sqlite+aiosqlite",
            "oracle",
            "nonsense",
            "",
        ]
    ),
    password=st.text(alphabet=PASSWORD_ALPHABET, min_size=12, max_size=20),
    host=st.one_of(st.just("127.0.0.1"), st.text(max_size=10)),
    port=st.one_of(st.integers(-1, 70_000).map(str), st.text(max_size=6), st.just("")),
    database=st.text(max_size=10),
    query=st.one_of(
        st.just(""),
        st.sampled_from(
            [
                "?prepared_statement_cache_size=abc",
                "?prepared_statement_cache_size=0",
                "?host=a&host=b",
                "?port=x",
                "?ssl=disable",
                "?application_name=x",
                "?sslmode=nonsense",
            ]
        ),
        st.sampled_from(["password", "sslpassword", "client_secret"]).map(
            lambda name: f"?{name}={{password}}"
        ),
        st.text(max_size=12).map(lambda q: "?" + q),
    ),
)
def test_a_bad_url_or_driver_is_a_clear_error_that_never_shows_the_password(
    driver: str, password: str, host: str, port: str, database: str, query: str
) -> None:
    query = query.replace("{password}", password)
    url = f"{driver}://app:{password}@{host}{':' if port else ''}{port}/{database}{query}"
    try:
        engine = build_engine(url=url)
    except ConfigurationError as error:
        assert error.setting == "url" or error.setting.startswith("URL parameter")
        assert password not in str(error) and password not in repr(error.value)
        if driver not in {"postgresql+asyncpg", "postgresql", "postgres", "postgresql+psycopg", ""}:
            assert "asyncpg" in str(error)
        return
    assert driver in {"postgresql+asyncpg", "postgresql", "postgres", "postgresql+psycopg"}
    expected = "postgresql+psycopg" if driver == "postgresql+psycopg" else "postgresql+asyncpg"
    assert engine.url.drivername == expected
    assert password not in repr(engine) and password not in repr(engine.url)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("mysql+aiomysql://app:pw@db/app", "asyncpg"),
        ("postgresql+psycopg2://app:pw@db/app", "asyncpg or psycopg"),
        ("sqlite+aiosqlite:///app.db", "asyncpg"),
        ("postgresql+asyncpg://app:pw@db:port/app", "host:5432"),
        ("postgresql+asyncpg://app:pw@db:70000/app", "port from 1 to 65535"),
        ("postgresql+asyncpg://app:pw@db/app?prepared_statement_cache_size=x", "integer from 0"),
        ("postgresql+asyncpg://app:pw@db/app?sslmode=on", "verify-full"),
        ("postgresql+asyncpg://app:pw@db/app?host=a&host=b", "ports are required"),
        ("not a url at all", "postgresql+asyncpg://"),
        ("", "postgresql+asyncpg://"),
    ],
)
def test_malformed_urls_and_wrong_drivers_say_what_is_expected(url: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        build_engine(url=url)
    assert fragment in str(raised.value)


def test_settings_are_plain_dataclass_fields() -> None:
    # The oracle above enumerates fields; a new setting must get a rule here.
    assert tuple(f.name for f in dataclasses.fields(PoolConfig)) == setting_names()
