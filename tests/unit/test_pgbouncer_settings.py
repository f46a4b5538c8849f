"""pooler="pgbouncer" sets the driver options together and refuses the ones that break them."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from asyncpool import ConfigurationError, PoolConfig, create_pooled_engine
from asyncpool._pgbouncer import unnamed_statement

URL = "postgresql+asyncpg://app:s3cret@127.0.0.1:6432/app"


async def test_pgbouncer_turns_caches_off_and_prepares_statements_unnamed() -> None:
    engine = create_pooled_engine(URL, pooler="pgbouncer")
    kwargs = await _connect_kwargs(engine)
    assert kwargs["statement_cache_size"] == 0
    assert kwargs["prepared_statement_cache_size"] == 0
    assert kwargs["prepared_statement_name_func"] is unnamed_statement
    assert unnamed_statement() == ""
    assert kwargs["server_settings"]["application_name"]


async def test_without_a_pooler_the_driver_defaults_are_kept() -> None:
    kwargs = await _connect_kwargs(create_pooled_engine(URL))
    assert "statement_cache_size" not in kwargs
    assert "prepared_statement_name_func" not in kwargs


@pytest.mark.parametrize(
    ("connect_args", "url", "setting"),
    [
        ({"statement_cache_size": 100}, URL, "statement_cache_size"),
        ({"prepared_statement_cache_size": 100}, URL, "prepared_statement_cache_size"),
        ({}, URL + "?prepared_statement_cache_size=500", "prepared_statement_cache_size"),
        ({}, URL + "?statement_cache_size=20", "statement_cache_size"),
        (
            {"prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__"},
            URL,
            "prepared_statement_name_func",
        ),
    ],
)
def test_pgbouncer_refuses_a_setting_that_breaks_transaction_pooling(
    connect_args: dict[str, Any], url: str, setting: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        create_pooled_engine(
            url, pooler="pgbouncer", name="orders", engine_options={"connect_args": connect_args}
        )
    message = str(caught.value)
    assert setting in message and "'orders'" in message and "pgbouncer" in message
    assert "s3cret" not in message


async def test_pgbouncer_accepts_caches_already_off() -> None:
    engine = create_pooled_engine(
        URL + "?prepared_statement_cache_size=0",
        PoolConfig(pooler="pgbouncer"),
        engine_options={"connect_args": {"statement_cache_size": 0}},
    )
    assert (await _connect_kwargs(engine))["statement_cache_size"] == 0


async def _connect_kwargs(engine: AsyncEngine) -> dict[str, Any]:
    """The keyword arguments the engine passes to ``asyncpg.connect``, without connecting."""
    captured: dict[str, Any] = {}

    def record(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        captured.update(cparams)
        raise _Captured

    event.listen(engine.sync_engine, "do_connect", record)
    with pytest.raises(_Captured):
        await engine.connect()
    return captured


class _Captured(Exception):
    """Raised by the do_connect listener so that no connection is attempted."""


def test_pooler_pgbouncer_is_refused_on_an_asyncpg_older_than_0_32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncpool import _pgbouncer

    monkeypatch.setattr(_pgbouncer, "asyncpg_version", lambda: (0, 31))
    with pytest.raises(ConfigurationError, match=r"asyncpg < 0\.32.*asyncpg#1335") as raised:
        create_pooled_engine("postgresql+asyncpg://app@127.0.0.1:6432/app", pooler="pgbouncer")
    assert raised.value.setting == "pooler"
