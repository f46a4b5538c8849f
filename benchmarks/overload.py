"""The overload scenario: more callers than connections, for a fixed time.

Pool 10 + overflow 20 (asyncpg: ``max_size=30``), a 2 s checkout timeout,
100 tasks each looping checkout, ``SELECT pg_sleep(0.02)``, release, with no
pause between release and the next checkout. The theoretical cap is
30 / 0.02 s = 1,500 ops/s. A fair pool serves everyone with waits of a few
query lengths; SQLAlchemy's queue lets the releasing task take its
connection straight back, so queued tasks starve into timeouts (perf.md §6).

Checkout wait is the time around the awaited checkout, for checkouts that
started inside the window; timeouts are counted by the start of the attempt.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any, Final

from ._stats import quantile
from .variants import Variant, open_subject

TASKS: Final = 100
POOL_SIZE: Final = 10
MAX_OVERFLOW: Final = 20
TIMEOUT: Final = 2.0
HOLD: Final = 0.02

#: Which throughput variant stands for each pool in this scenario (ap_notel
#: separates the pool from its telemetry: here every checkout queues).
OVERLOAD_VARIANTS: Final = (
    "sa",
    "asyncpg",
    "ap_default",
    "ap_notel",
    "pg_sa",
    "pg_pool",
    "pg_ap_default",
)


async def overload_cell(
    variant: Variant, target: dict[str, str], warmup: float, window: float
) -> dict[str, Any]:
    """One overload run of ``variant``'s pool; waits in seconds, counts over ``window``."""
    from sqlalchemy import text
    from sqlalchemy.exc import TimeoutError as SATimeoutError

    gc.collect()
    subject = await open_subject(
        variant,
        target,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_timeout=TIMEOUT,
    )
    query = text("SELECT pg_sleep(:s)")
    waits: list[float] = []
    timeouts = done = 0
    stop = False
    start = time.perf_counter() + warmup
    end = start + window

    async def sa_worker() -> None:
        nonlocal timeouts, done
        engine = subject.engine
        while not stop:
            began = time.perf_counter()
            try:
                conn = await engine.connect()
            except SATimeoutError:
                if start <= began < end:
                    timeouts += 1
                continue
            got = time.perf_counter()
            try:
                await conn.execute(query, {"s": HOLD})
            finally:
                await conn.close()
            if start <= began < end:
                waits.append(got - began)
            if start <= time.perf_counter() < end:
                done += 1

    async def asyncpg_worker() -> None:
        nonlocal timeouts, done
        pool = subject.pool
        while not stop:
            began = time.perf_counter()
            try:
                conn = await pool.acquire(timeout=TIMEOUT)
            except TimeoutError:
                if start <= began < end:
                    timeouts += 1
                continue
            got = time.perf_counter()
            try:
                await conn.fetchval("SELECT pg_sleep($1)", HOLD)
            finally:
                await pool.release(conn)
            if start <= began < end:
                waits.append(got - began)
            if start <= time.perf_counter() < end:
                done += 1

    async def psycopg_pool_worker() -> None:
        from psycopg_pool import PoolTimeout

        nonlocal timeouts, done
        pool = subject.pool
        while not stop:
            began = time.perf_counter()
            try:
                conn = await pool.getconn(timeout=TIMEOUT)
            except PoolTimeout:
                if start <= began < end:
                    timeouts += 1
                continue
            got = time.perf_counter()
            try:
                await conn.execute("SELECT pg_sleep(%s)", (HOLD,))
                await conn.commit()
            finally:
                await pool.putconn(conn)
            if start <= began < end:
                waits.append(got - began)
            if start <= time.perf_counter() < end:
                done += 1

    workers = {"asyncpg": asyncpg_worker, "psycopg_pool": psycopg_pool_worker}
    worker = workers.get(variant.kind, sa_worker)
    try:
        tasks = [asyncio.create_task(worker()) for _ in range(TASKS)]
        await asyncio.sleep(max(start - time.perf_counter(), 0.0))
        cpu0 = time.process_time()
        await asyncio.sleep(max(end - time.perf_counter(), 0.0))
        cpu1 = time.process_time()
        stop = True
        await asyncio.gather(*tasks)
        stats = subject.stats()
    finally:
        await subject.close()
    waits.sort()
    return {
        "ops": done,
        "ops_s": done / window,
        "timeouts": timeouts,
        "checkouts": len(waits),
        "wait_p50_ms": 1000 * quantile(waits, 0.50),
        "wait_p95_ms": 1000 * quantile(waits, 0.95),
        "wait_p99_ms": 1000 * quantile(waits, 0.99),
        "wait_max_ms": 1000 * (waits[-1] if waits else float("nan")),
        "cpu_us_op": 1e6 * (cpu1 - cpu0) / done if done else float("nan"),
        "pool": stats,
    }
