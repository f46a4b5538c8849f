"""Leak detection: a connection held past ``leak_threshold`` is found and named.

HikariCP's leak detection: one warning, with the stack that checked the
connection out, when it is held too long; a "cleared" line when it comes back.
Off by default, and then no stack is ever captured.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker

from asyncpool import statistics
from asyncpool._pool import _leaks as leaks_module
from asyncpool.engine import pool_of
from tests.fix_db import EngineFactory, wait_until

THRESHOLD = 0.2


def leak_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "asyncpool.pool" and "leak" in r.getMessage()]


async def check_out_and_forget_it(engine: AsyncEngine) -> AsyncConnection:
    """The code path the warning must point at."""
    conn = await engine.connect()
    await conn.execute(text("SELECT 1"))
    return conn


async def test_held_connection_logs_one_warning_with_its_checkout_stack(
    make_engine: EngineFactory, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, leak_threshold=THRESHOLD)
    conn = await check_out_and_forget_it(engine)
    await wait_until(lambda: statistics(engine).leaks_detected == 1, what="the leak report")

    (warning,) = leak_records(caplog)
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert app_name in message and f"leak_threshold={THRESHOLD:g}" in message
    # The stack crosses SQLAlchemy's greenlet bridge back to the caller's code.
    assert "check_out_and_forget_it" in message
    assert "test_held_connection_logs_one_warning_with_its_checkout_stack" in message
    assert "sqlalchemy/" not in message  # the pool's and SQLAlchemy's own frames are dropped

    # One warning per checkout, however long it is held (an observation
    # window, not a synchronisation).
    await asyncio.sleep(2 * THRESHOLD)
    assert len(leak_records(caplog)) == 1
    await conn.close()
    cleared = leak_records(caplog)[1:]
    assert [r.levelno for r in cleared] == [logging.WARNING]
    assert "cleared" in cleared[0].getMessage() and app_name in cleared[0].getMessage()
    stats = statistics(engine)
    assert (stats.leaks_detected, stats.checked_out) == (1, 0)
    assert pool_of(engine).leak_timers_armed == 0


async def test_session_held_past_the_threshold_is_reported_once_and_cleared(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0, leak_threshold=THRESHOLD)
    sessions = async_sessionmaker(engine)
    async with sessions() as session:
        await session.execute(text("SELECT 1"))
        await wait_until(lambda: statistics(engine).leaks_detected == 1, what="the leak report")
        async with engine.connect() as quick:  # a short checkout meanwhile: no report
            await quick.execute(text("SELECT 1"))
    messages = [r.getMessage() for r in leak_records(caplog)]
    assert len(messages) == 2
    assert "leak suspected" in messages[0] and "cleared" in messages[1]
    assert statistics(engine).leaks_detected == 1


async def test_connection_returned_in_time_is_never_reported(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, leak_threshold=60)
    for _ in range(3):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    assert pool_of(engine).leak_timers_armed == 0  # every timer cancelled on return
    assert leak_records(caplog) == []
    assert statistics(engine).leaks_detected == 0


async def test_invalidated_leaked_connection_clears_its_report(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, leak_threshold=THRESHOLD)
    conn = await check_out_and_forget_it(engine)
    await wait_until(lambda: statistics(engine).leaks_detected == 1, what="the leak report")
    await conn.invalidate()
    await conn.close()
    assert ["cleared" in r.getMessage() for r in leak_records(caplog)] == [False, True]
    assert pool_of(engine).leak_timers_armed == 0


async def test_no_stack_is_captured_with_leak_detection_off(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = 0

    def counting_stack() -> str:
        nonlocal captured
        captured += 1
        return ""

    monkeypatch.setattr(leaks_module, "_caller_stack", counting_stack)
    engine = make_engine(pool_size=1, max_overflow=0)
    for _ in range(3):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    assert captured == 0 and pool_of(engine).leak_timers_armed == 0

    detecting = make_engine(name="detecting", pool_size=1, max_overflow=0, leak_threshold=60)
    async with detecting.connect() as conn:
        await conn.execute(text("SELECT 1"))
    assert captured == 1
