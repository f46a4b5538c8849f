"""One session or connection used by two tasks at once (issue 13).

``asyncio.gather`` over one ``AsyncSession`` used to end in SQLAlchemy's
``IllegalStateChangeError`` with a connection left checked out, or in asyncpg's
``another operation is in progress`` with the server's transaction left open
behind SQLAlchemy's back. Now the second task gets ``ConcurrentUseError``
naming both tasks, the first task's work completes, and nothing is left
checked out, running or open on the server. One session per task works.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session as SyncSession

from asyncpool import (
    AsyncPoolError,
    ConcurrentUseError,
    ConfigurationError,
    PoolConfig,
    statistics,
)
from asyncpool._concurrent import detect_concurrent_use
from asyncpool.engine import pool_of
from tests.fix_db import EngineFactory, TestDatabase

SLOW = text("SELECT pg_sleep(0.2)")


def named(coro: Any, name: str) -> asyncio.Task[Any]:
    return asyncio.create_task(coro, name=name)


def test_concurrent_use_error_is_what_callers_already_catch() -> None:
    assert issubclass(ConcurrentUseError, AsyncPoolError)
    assert issubclass(ConcurrentUseError, sqlalchemy.exc.InvalidRequestError)


def test_the_session_check_is_on_in_asyncio_debug_mode_unless_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PYTHONASYNCIODEBUG", raising=False)
    assert detect_concurrent_use(PoolConfig()) is sys.flags.dev_mode
    assert detect_concurrent_use(PoolConfig(detect_concurrent_use=True))
    monkeypatch.setenv("PYTHONASYNCIODEBUG", "1")
    assert detect_concurrent_use(PoolConfig())
    assert not detect_concurrent_use(PoolConfig(detect_concurrent_use=False))
    with pytest.raises(ConfigurationError, match="detect_concurrent_use must be True or False"):
        PoolConfig(detect_concurrent_use="yes")  # type: ignore[arg-type]


async def test_gather_over_a_new_session_names_both_tasks_and_leaves_nothing(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0, detect_concurrent_use=True)
    with pytest.raises(ConcurrentUseError) as caught:
        async with AsyncSession(engine) as session:
            await asyncio.gather(
                named(session.execute(SLOW), "report"),
                named(session.execute(text("SELECT 1")), "audit"),
            )
    message = str(caught.value)
    assert "'audit'" in message and "'report'" in message
    assert (caught.value.task, caught.value.other_task) == ("audit", "report")
    assert "one task at a time" in message
    assert statistics(engine).checked_out == 0
    await database.assert_clean(app_name, bound=2)


async def test_a_commit_racing_a_statement_is_refused_and_the_server_agrees(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0)
    async with AsyncSession(engine) as session:
        await session.execute(text("SELECT 1"))  # the session has its connection
        first, second = await asyncio.gather(
            named(session.execute(SLOW), "report"),
            named(session.commit(), "saver"),
            return_exceptions=True,
        )
        assert not isinstance(first, BaseException)  # the first task's work completed
        assert isinstance(second, ConcurrentUseError)
        assert "'saver'" in str(second) and "'report'" in str(second)
        # The refused commit leaves the session to be rolled back, as any failed commit.
        await session.rollback()
        assert (await session.execute(text("SELECT 2"))).scalar_one() == 2
    await pool_of(engine).wait_cleaned()
    assert statistics(engine).checked_out == 0
    await database.assert_clean(app_name, bound=2)


async def test_a_connection_stays_usable_by_its_first_task(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))

        async def first() -> int:
            await conn.execute(SLOW)
            return int((await conn.execute(text("SELECT 7"))).scalar_one())

        results = await asyncio.gather(
            named(first(), "first"), named(conn.rollback(), "second"), return_exceptions=True
        )
        assert results[0] == 7
        assert isinstance(results[1], ConcurrentUseError)
        assert (await conn.execute(text("SELECT 8"))).scalar_one() == 8
    assert statistics(engine).checked_out == 0
    await database.assert_clean(app_name, bound=1)


async def test_one_session_per_task_does_the_same_work(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine: AsyncEngine = make_engine(pool_size=2, max_overflow=0)
    Session = async_sessionmaker(engine)

    async def run(statement: Any) -> Any:
        async with Session() as session:
            return (await session.execute(statement)).scalar_one()

    slow, one = await asyncio.gather(run(SLOW), run(text("SELECT 1")))
    assert (slow in (None, ""), one) == (True, 1)  # pg_sleep's void: '' on psycopg
    assert statistics(engine).checked_out == 0
    await database.assert_clean(app_name, bound=2)


# SQLAlchemy warns when the rollback finds its transaction already ending.
@pytest.mark.filterwarnings("ignore:transaction already deassociated")
async def test_a_commit_racing_a_rollback_leaves_no_phantom_transaction(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        results = await asyncio.gather(conn.commit(), conn.rollback(), return_exceptions=True)
        assert results[0] is None and isinstance(results[1], ConcurrentUseError)
        # The block is over on the server; the next one begins as any would.
        assert (await conn.execute(text("SELECT 3"))).scalar_one() == 3
        await conn.commit()
    assert statistics(engine).cleanups == 0  # given back clean, nothing to put in order
    await database.assert_clean(app_name, bound=1)


async def test_a_statement_from_after_begin_gets_sqlalchemys_error_at_once(
    make_engine: EngineFactory,
) -> None:
    """The task connecting the session is not a second task: no waiting for itself."""
    engine = make_engine(pool_size=1, max_overflow=0, detect_concurrent_use=True)

    def set_local(session: Any, transaction: Any, connection: Any) -> None:
        session.execute(text("SELECT set_config('app.tenant', '42', true)"))

    class TenantSession(SyncSession):
        pass

    event.listen(TenantSession, "after_begin", set_local)
    Session = async_sessionmaker(engine, sync_session_class=TenantSession)
    started = asyncio.get_running_loop().time()
    with pytest.raises(sqlalchemy.exc.InvalidRequestError, match="provisioning") as caught:
        async with Session() as session:
            await session.execute(text("SELECT 1"))
    assert not isinstance(caught.value, ConcurrentUseError)
    assert asyncio.get_running_loop().time() - started < 1.0
