"""Load demo: the same overload on SQLAlchemy's pool and on asyncpool's, side by side.

100 tasks loop over a pool of 10 + 20 overflow (timeout 2 s), each holding its
connection for a 20 ms query. SQLAlchemy's queue lets a task that just
returned a connection take it straight back, so queued tasks starve into
timeouts; asyncpool hands each returned connection to the oldest waiter.

    python examples/load_demo.py              # embedded PostgreSQL
    DATABASE_URL=postgresql://... python examples/load_demo.py
"""

from __future__ import annotations

import asyncio
import sys
import time

from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncpool
from asyncpool.embedded import database_url

TASKS, SECONDS, HOLD = 100, 5.0, 0.02


async def drive(engine: AsyncEngine) -> dict[str, float]:
    waits: list[float] = []
    timeouts = served = 0
    stop = time.perf_counter() + SECONDS

    async def worker() -> None:
        nonlocal timeouts, served
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                conn = await engine.connect()
            except SATimeoutError:
                timeouts += 1
                continue
            waits.append(time.perf_counter() - started)
            try:
                await conn.execute(text("SELECT pg_sleep(:s)"), {"s": HOLD})
            finally:
                await conn.close()
            served += 1

    await asyncio.gather(*(worker() for _ in range(TASKS)))
    waits.sort()
    return {
        "served": served,
        "timeouts": timeouts,
        "p50_ms": 1000 * waits[len(waits) // 2],
        "p99_ms": 1000 * waits[int(len(waits) * 0.99)],
        "max_ms": 1000 * waits[-1],
    }


async def main(url: str) -> None:
    url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    sizes = {"pool_size": 10, "max_overflow": 20, "pool_timeout": 2}
    plain = create_async_engine(url, **sizes)
    fair = asyncpool.create_pooled_engine(url, name="demo", **sizes)
    print(
        f"{TASKS} tasks, pool 10 + 20 overflow, timeout 2 s, {HOLD * 1000:.0f} ms per query, "
        f"{SECONDS:.0f} s each\n"
    )
    print(f"{'pool':<28}{'served':>8}{'timeouts':>10}{'wait p50':>10}{'p99':>9}{'max':>9}")
    for label, engine in (("SQLAlchemy AsyncAdaptedQueue", plain), ("asyncpool (fair FIFO)", fair)):
        r = await drive(engine)
        print(
            f"{label:<28}{r['served']:>8.0f}{r['timeouts']:>10.0f}{r['p50_ms']:>8.0f}ms"
            f"{r['p99_ms']:>7.0f}ms{r['max_ms']:>7.0f}ms",
            flush=True,
        )
    print("\nasyncpool.statistics():", asyncpool.statistics(fair))
    await plain.dispose()
    await fair.dispose()


if __name__ == "__main__":
    with database_url() as url:
        asyncio.run(main(url))
    sys.exit(0)
