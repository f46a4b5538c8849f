"""pooler="pgbouncer": thousands of mixed statements through a real PgBouncer, no errors.

PgBouncer runs in transaction mode with 4 server connections for 20 client
connections (4 processes x 5), so every transaction, and every autocommit
statement, may land on another server connection. ``RECONNECT`` from the
admin console replaces the server connections while the processes run.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import queue
from typing import Any, Final

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import asyncpool
from tests.fix_db import TestDatabase
from tests.fix_pgbouncer import PgBouncer, pgbouncer_for

PROCESSES: Final = 4
STATEMENTS: Final = 800  # per process
TASKS: Final = 8  # concurrent tasks per process
TABLE: Final = "pgbouncer_mixed"


async def _unit(engine: AsyncEngine, kind: int, worker: int, i: int) -> tuple[int, int]:
    """One piece of the mix; returns (statements run, rows inserted)."""
    if kind == 0:  # parameterised select, implicit transaction
        async with engine.connect() as conn:
            total = await conn.scalar(
                text("SELECT CAST(:a AS int) + CAST(:b AS int)"), {"a": i, "b": 1}
            )
            assert total == i + 1
        return 1, 0
    if kind == 1:  # explicit transaction: insert, then read it back
        async with engine.begin() as conn:
            await _insert(conn, worker, i)
            await conn.scalar(
                text(f"SELECT count(*) FROM {TABLE} WHERE worker = :w"), {"w": worker}
            )
        return 2, 1
    if kind == 2:  # autocommit: every statement its own transaction
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            value = await conn.scalar(text("SELECT CAST(:x AS text)"), {"x": f"w{worker}-{i}"})
            assert value == f"w{worker}-{i}"
            await _insert(conn, worker, i)
        return 2, 1
    if kind == 3:  # server-side cursor inside an explicit transaction
        async with engine.begin() as conn:
            result = await conn.stream(text("SELECT g FROM generate_series(1, :n) AS g"), {"n": 30})
            assert [row[0] async for row in result] == list(range(1, 31))
        return 1, 0
    # executemany in an explicit transaction
    async with engine.begin() as conn:
        await conn.execute(
            text(f"INSERT INTO {TABLE} (worker, n) VALUES (:w, :n)"),
            [{"w": worker, "n": i * 10 + k} for k in range(3)],
        )
    return 1, 3


async def _insert(conn: AsyncConnection, worker: int, i: int) -> None:
    await conn.execute(
        text(f"INSERT INTO {TABLE} (worker, n) VALUES (:w, :n)"), {"w": worker, "n": i}
    )


async def _run_mix(
    url: str, worker: int, pooler: str | None, halfway: Any, resume: Any
) -> dict[str, Any]:
    engine = asyncpool.create_pooled_engine(
        url,
        name=f"pgb-{worker}",
        pooler=pooler,
        pool_size=3,
        max_overflow=2,
        pre_ping=True,
        pre_ping_skip_window=0.0,  # ping every reused connection
        pool_timeout=30,
        telemetry=False,
    )
    errors: collections.Counter[str] = collections.Counter()
    done = {"statements": 0, "rows": 0}
    counter = iter(range(10**9))

    async def task() -> None:
        while done["statements"] < STATEMENTS:
            i = next(counter)
            if i == STATEMENTS // 4 and halfway is not None:
                halfway.put(worker)  # RECONNECT happens while the mix keeps running
                await asyncio.to_thread(resume.wait, 30)
            try:
                statements, rows = await _unit(engine, i % 5, worker, i)
            except Exception as exc:
                errors[f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"] += 1
                statements, rows = 1, 0
            done["statements"] += statements
            done["rows"] += rows

    try:
        await asyncio.gather(*(task() for _ in range(TASKS)))
        stats = asyncpool.statistics(engine)
    finally:
        await engine.dispose()
    return {"errors": dict(errors), **done, "pre_pings": stats.pre_pings}


def _worker(url: str, worker: int, pooler: str | None, halfway: Any, resume: Any, out: Any) -> None:
    out.put((worker, asyncio.run(_run_mix(url, worker, pooler, halfway, resume))))


async def _reset_table(database: TestDatabase) -> None:
    await database.fetch(f"DROP TABLE IF EXISTS {TABLE}")
    await database.fetch(f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, worker int, n int)")


def _prepared_statement_errors(errors: dict[str, int]) -> int:
    return sum(n for message, n in errors.items() if "prepared statement" in message)


@pytest.mark.slow  # the main pass runs it; the other passes deselect it
async def test_four_processes_run_mixed_statements_through_pgbouncer_without_statement_errors(
    pgbouncer: PgBouncer, database: TestDatabase
) -> None:
    await _reset_table(database)
    replaced_before = pgbouncer.servers_replaced()
    ctx = multiprocessing.get_context("spawn")
    halfway, out, resume = ctx.Queue(), ctx.Queue(), ctx.Event()
    processes = [
        ctx.Process(target=_worker, args=(pgbouncer.url(), w, "pgbouncer", halfway, resume, out))
        for w in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        for _ in range(PROCESSES):
            await asyncio.to_thread(halfway.get, True, 60)
        assert await pgbouncer.admin("RECONNECT") == "RECONNECT"
        resume.set()
        results: dict[int, dict[str, Any]] = {}
        reconnects = 1
        while len(results) < PROCESSES:
            try:
                worker, result = await asyncio.to_thread(out.get, True, 0.2)
                results[worker] = result
            except queue.Empty:
                if reconnects < 20:  # more RECONNECTs while the statements run
                    await pgbouncer.admin("RECONNECT")
                    reconnects += 1
    finally:
        for process in processes:
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                process.kill()
    errors = collections.Counter[str]()
    for result in results.values():
        errors.update(result["errors"])
    assert _prepared_statement_errors(errors) == 0, errors
    assert not errors, errors
    assert all(r["statements"] >= STATEMENTS for r in results.values())
    assert sum(r["statements"] for r in results.values()) >= PROCESSES * STATEMENTS
    assert all(r["pre_pings"] > 0 for r in results.values())
    inserted = sum(r["rows"] for r in results.values())
    assert await database.fetchval(f"SELECT count(*) FROM {TABLE}") == inserted
    assert pgbouncer.servers_replaced() > replaced_before  # RECONNECT really replaced servers


async def test_without_the_pooler_setting_the_same_mix_breaks_on_prepared_statements(
    pgbouncer: PgBouncer, database: TestDatabase
) -> None:
    # The control: the fixture is a real transaction pooler, so asyncpg's
    # defaults (cached, numbered statements) fail through it.
    await _reset_table(database)
    result = await _run_mix(pgbouncer.url(), 0, None, None, None)
    assert _prepared_statement_errors(result["errors"]) > 0, result["errors"]


async def test_pgbouncer_setting_leaves_no_prepared_statement_on_the_server(
    make_engine: Any,
) -> None:
    engine = make_engine(pooler="pgbouncer", pool_size=1, max_overflow=0)
    async with engine.connect() as conn:
        for i in range(3):
            await conn.scalar(text("SELECT CAST(:i AS int)"), {"i": i})
        await conn.commit()
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.scalar(text("SELECT CAST(:i AS int)"), {"i": 9})
        left = await conn.scalar(text("SELECT count(*) FROM pg_prepared_statements"))
    assert left == 0


async def test_pgbouncer_fixture_is_in_transaction_mode_with_few_server_connections(
    database: TestDatabase,
) -> None:
    # Two clients, one server connection: the second client's transaction
    # runs on the backend the first one just released.
    with pgbouncer_for(database, pool_size=1) as bouncer:
        engine = asyncpool.create_pooled_engine(
            bouncer.url(), pooler="pgbouncer", pool_size=2, max_overflow=0, telemetry=False
        )
        try:
            async with asyncio.timeout(10), engine.connect() as first, engine.connect() as second:
                pids = set()
                for conn in (first, second, first):
                    pids.add(await conn.scalar(text("SELECT pg_backend_pid()")))
                    await conn.commit()  # the server connection goes back to PgBouncer
        finally:
            await engine.dispose()
    assert len(pids) == 1
