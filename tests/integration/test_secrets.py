"""The password never appears in anything asyncpool or the engine emits."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

import asyncpool
from asyncpool import PoolTimeoutError, create_pooled_engine, statistics
from asyncpool.embedded import free_port
from tests.fix_db import TestDatabase

SECRET = "pa55-S3CRET-xyzzy"


def with_password(url: str, password: str = SECRET) -> str:
    return make_url(url).set(password=password).render_as_string(hide_password=False)


async def test_password_never_appears_in_reprs_logs_stats_or_errors(
    database: TestDatabase,
    app_name: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # everything SQLAlchemy and asyncpool log
    # The test server trusts local connections, so the password is sent only
    # if asked for; it still travels through every layer that could leak it.
    engine = create_pooled_engine(
        with_password(database.url),
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.1,
        application_name=app_name,
        engine_options={"echo": "debug", "echo_pool": "debug"},
    )
    outputs: list[str] = [repr(engine), str(engine.url), repr(engine.sync_engine)]
    outputs.append(repr(engine.sync_engine.pool))
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        with pytest.raises(PoolTimeoutError) as timeout:
            await engine.connect()
        outputs.append(str(timeout.value))
        outputs.append(repr(timeout.value))
    outputs.append(repr(statistics(engine)))
    outputs.append(repr(engine.sync_engine.pool.state.config))
    await engine.dispose()

    unreachable = create_pooled_engine(
        with_password(f"postgresql+asyncpg://app@127.0.0.1:{free_port()}/test"),
        connect_timeout=1,
    )
    with pytest.raises(OSError) as refused:
        await unreachable.connect()
    outputs.append(str(refused.value))
    outputs.append(repr(refused.value))
    await unreachable.dispose()

    with pytest.raises(asyncpool.ConfigurationError) as bad:
        create_pooled_engine(with_password("mysql+aiomysql://app@db/x"))
    outputs.append(str(bad.value))

    captured = capsys.readouterr()
    outputs += [captured.out, captured.err, caplog.text]
    outputs += [str(record.args) for record in caplog.records]
    assert caplog.records, "the engine logged nothing: the log check would prove nothing"
    for output in outputs:
        assert SECRET not in output
