"""PoolConfig validation and from_env(): every bad value is refused, by name, with its range."""

from __future__ import annotations

import dataclasses
import math

import pytest

from asyncpool import ConfigurationError, PoolConfig, create_pooled_engine
from asyncpool.config import setting_names

URL = "postgresql+asyncpg://app:s3cret@127.0.0.1:5432/test"

# setting -> (invalid values, a valid non-default value)
CASES: dict[str, tuple[list[object], object]] = {
    "name": (["", "x" * 64, "naïve", "tab\there", 5], "orders"),
    "pool_size": ([0, -1, 10_001, 2.5, True, "5", None], 3),
    "max_overflow": ([-1, 10_001, 1.0, False, None], 0),
    "pool_timeout": ([0, -1.0, math.inf, math.nan, "3", None, True], 0.5),
    "pool_recycle": ([0, -1, math.inf, "60"], None),
    "pre_ping": ([1, 0, "yes", None], False),
    "pre_ping_timeout": ([0, -0.1, math.nan, None], 1.5),
    "pre_ping_skip_window": ([-0.001, math.inf, None], 0.0),
    "max_waiting": ([-1, 0.5, 1_000_001, None], 50),
    "use_lifo": ([1, "true", None], True),
    "connect_timeout": ([0, -3, math.inf, None], 2.0),
    "command_timeout": ([0, -1, math.nan], 30.0),
    "leak_threshold": ([0, -5, math.inf], 5.0),
    "application_name": (["", "y" * 64, "ünïcode"], "billing-api"),
    "min_idle": ([-1, 11, 1.5], 0),
    "pooler": (["pgpool", "", "PgBouncer", 5], "pgbouncer"),
    "cleanup_timeout": ([0, -1, math.inf, None, "5"], 1.0),
    "client_connection_check_interval": ([0, 0.0001, 3_000_000, math.inf, -1], None),
    "detect_concurrent_use": ([1, "true"], None),
    "idle_timeout": ([0, -1, math.inf, "10"], None),
    "recycle_jitter": ([-0.1, 0.6, math.nan, None, "0.2"], 0.0),
    "keepalive_interval": ([0, -1, math.inf], None),
    "pool_per_loop": ([1, "true", None], True),
    "max_loops": ([0, 1025, 2.0, None, True], 4),
}


def test_every_setting_has_validation_cases() -> None:
    assert set(CASES) == set(setting_names())


def test_defaults_are_valid_and_production_minded() -> None:
    config = PoolConfig()
    assert config.pre_ping is True
    assert config.pre_ping_skip_window == 0.5
    assert config.pool_recycle is not None and config.pool_recycle > 0
    assert config.max_size == config.pool_size + config.max_overflow
    assert config.effective_min_idle == config.pool_size


@pytest.mark.parametrize(
    ("setting", "value"),
    [(s, v) for s, (bad, _) in CASES.items() for v in bad],
    ids=lambda x: repr(x)[:20],
)
def test_invalid_setting_is_refused_with_its_name_value_and_range(
    setting: str, value: object
) -> None:
    with pytest.raises(ConfigurationError) as info:
        PoolConfig(**{setting: value})
    error = info.value
    assert isinstance(error, ValueError)
    assert error.setting == setting
    message = str(error)
    assert message.startswith(f"{setting} must be ")
    assert repr(value) in message


@pytest.mark.parametrize("setting", sorted(CASES))
def test_valid_setting_is_accepted(setting: str) -> None:
    good = CASES[setting][1]
    assert getattr(PoolConfig(**{setting: good}), setting) == good


def test_min_idle_range_names_pool_size() -> None:
    with pytest.raises(ConfigurationError, match=r"from 0 to pool_size \(3\)"):
        PoolConfig(pool_size=3, min_idle=4)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PoolConfig().pool_size = 3  # type: ignore[misc]


def test_replace_validates_and_refuses_unknown_settings() -> None:
    assert PoolConfig().replace(pool_size=3).pool_size == 3
    with pytest.raises(ConfigurationError, match="pool_size must be"):
        PoolConfig().replace(pool_size=0)
    with pytest.raises(ConfigurationError, match="poolsize"):
        PoolConfig().replace(poolsize=3)


def test_from_env_reads_every_kind_of_setting() -> None:
    env = {
        "ASYNCPOOL_POOL_SIZE": "20",
        "ASYNCPOOL_POOL_TIMEOUT": "2.5",
        "ASYNCPOOL_PRE_PING": "off",
        "ASYNCPOOL_POOL_RECYCLE": "none",
        "ASYNCPOOL_NAME": "orders",
        "ASYNCPOOL_USE_LIFO": "Yes",
        "ASYNCPOOL_TEST_DSN": "postgresql://ignored",  # the harness's variable, not a setting
        "OTHER": "x",
    }
    config = PoolConfig.from_env(environ=env)
    assert config.pool_size == 20
    assert config.pool_timeout == 2.5
    assert config.pre_ping is False
    assert config.pool_recycle is None
    assert config.name == "orders"
    assert config.use_lifo is True


def test_from_env_uses_a_custom_prefix_and_defaults() -> None:
    config = PoolConfig.from_env("DB_", environ={"DB_MAX_OVERFLOW": "0"}, pool_size=4)
    assert (config.pool_size, config.max_overflow) == (4, 0)


@pytest.mark.parametrize(
    ("key", "raw", "fragment"),
    [
        ("ASYNCPOOL_POOL_SIZE", "ten", "an integer"),
        ("ASYNCPOOL_POOL_SIZE", "2.5", "an integer"),
        ("ASYNCPOOL_POOL_TIMEOUT", "soon", "a number of seconds"),
        ("ASYNCPOOL_COMMAND_TIMEOUT", "x", "or 'none'"),
        ("ASYNCPOOL_PRE_PING", "maybe", "a boolean"),
        ("ASYNCPOOL_POOL_SIZ", "5", "a setting, one of"),
    ],
)
def test_from_env_refuses_bad_strings_and_unknown_keys(key: str, raw: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        PoolConfig.from_env(environ={key: raw})
    assert info.value.setting == key
    assert fragment in str(info.value)


def test_from_env_value_out_of_range_names_the_setting() -> None:
    with pytest.raises(ConfigurationError, match="pool_size must be an integer from 1"):
        PoolConfig.from_env(environ={"ASYNCPOOL_POOL_SIZE": "0"})


@pytest.mark.parametrize(
    "url",
    [
        "mysql+aiomysql://app:s3cret@localhost/db",
        "postgresql+psycopg2://app:s3cret@localhost/db",
        "sqlite+aiosqlite:///x.db",
    ],
)
def test_engine_refuses_a_url_that_is_not_postgresql_on_asyncpg_or_psycopg(url: str) -> None:
    with pytest.raises(ConfigurationError, match="asyncpg") as info:
        create_pooled_engine(url)
    assert "s3cret" not in str(info.value)


def test_engine_refuses_a_malformed_url_without_echoing_it() -> None:
    with pytest.raises(ConfigurationError) as info:
        create_pooled_engine("not a url :// s3cret")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        create_pooled_engine("postgresql+asyncpg://app:s3cret@host:notaport/db")
    assert "s3cret" not in str(info.value)


def test_engine_accepts_plain_postgresql_urls_as_asyncpg() -> None:
    engine = create_pooled_engine("postgresql://app:s3cret@127.0.0.1/test")
    assert engine.url.drivername == "postgresql+asyncpg"


def test_engine_refuses_bad_overrides_and_reserved_engine_options() -> None:
    with pytest.raises(ConfigurationError, match="pool_size must be"):
        create_pooled_engine(URL, pool_size=-3)
    with pytest.raises(ConfigurationError, match="pool_sise"):
        create_pooled_engine(URL, pool_sise=3)
    with pytest.raises(ConfigurationError, match="poolclass"):
        create_pooled_engine(URL, engine_options={"poolclass": object})
    with pytest.raises(ConfigurationError, match="config must be a PoolConfig"):
        create_pooled_engine(URL, config={"pool_size": 3})  # type: ignore[arg-type]


def test_engine_creation_opens_no_connection() -> None:
    # Port 1 on loopback has no server: creating the engine must not notice.
    engine = create_pooled_engine("postgresql+asyncpg://app:s3cret@127.0.0.1:1/test")
    assert engine.sync_engine.pool.checkedout() == 0


def test_from_env_skips_the_variables_that_are_not_pool_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncpool.config import OTHER_VARIABLES

    env = {name: "0" for name in OTHER_VARIABLES} | {"ASYNCPOOL_POOL_SIZE": "3"}
    assert PoolConfig.from_env(environ=env).pool_size == 3
    # ... and so does the command, which reads the same environment.
    import argparse

    from asyncpool.cli._args import config_from_args

    for name in OTHER_VARIABLES:
        monkeypatch.setenv(name, "4")
    assert config_from_args(argparse.Namespace(), {}).pool_size == PoolConfig().pool_size


def test_a_misspelt_variable_under_the_prefix_is_still_an_error() -> None:
    with pytest.raises(ConfigurationError, match="ASYNCPOOL_POOLSIZE"):
        PoolConfig.from_env(environ={"ASYNCPOOL_POOLSIZE": "3"})


def test_every_asyncpool_variable_read_anywhere_is_a_setting_or_in_the_one_table() -> None:
    import re
    from pathlib import Path

    from asyncpool.config import OTHER_VARIABLES, setting_names

    root = Path(__file__).resolve().parents[2]
    sources = [*root.joinpath("asyncpool").rglob("*.py"), root / "tests" / "fix_db.py"]
    read = {
        name
        for path in sources
        for name in re.findall(r"[\"'](ASYNCPOOL_[A-Z_]+)[\"']", path.read_text())
    }
    settings = {"ASYNCPOOL_" + name.upper() for name in setting_names()}
    assert read - {"ASYNCPOOL_"} <= settings | set(OTHER_VARIABLES)
    readme = root.joinpath("docs", "configuration.md").read_text()  # the variables table
    for name in OTHER_VARIABLES:
        assert f"`{name}`" in readme
