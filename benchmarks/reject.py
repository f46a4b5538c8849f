"""Load shedding: how fast ``max_waiting`` says no under a 10x spike.

A pool of 10 (no overflow, ``max_waiting=10``) is kept fully busy by 10
tasks looping checkout, ``SELECT pg_sleep(0.01)``, release. Then, again and
again, 100 more callers (10x the pool) arrive at once, each wanting one
checkout. About 10 of them may queue; the rest must be refused at once with
``PoolOverloadedError`` instead of queueing for ``pool_timeout``.

Rejection latency is the time from calling ``engine.connect()`` to the
error reaching the caller, through SQLAlchemy's async facade and greenlet
bridge (what an application sees). "Answered after" is measured from the
moment the spike arrived, so it also counts the event loop running the
spike's other tasks first. A refusal never awaits, so its thread CPU time
is also taken: on a loaded machine the wall-clock tail is mostly the
process being descheduled, which the CPU time does not see.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any, Final

from ._stats import quantile
from .variants import Variant, open_subject

POOL_SIZE: Final = 10
MAX_WAITING: Final = 10
SPIKE: Final = 10 * POOL_SIZE
HOLD: Final = 0.01
#: A steady worker that was refused backs off this long (a refusal never awaits).
BACKOFF: Final = 0.005

REJECT_VARIANTS: Final = ("ap_default", "ap_notel", "pg_ap_default")


async def reject_cell(
    variant: Variant, target: dict[str, str], spikes: int, gap: float
) -> dict[str, Any]:
    """``spikes`` spikes of ``SPIKE`` callers on a busy pool; latencies in ms."""
    from sqlalchemy import text

    from asyncpool import PoolOverloadedError, PoolTimeoutError

    gc.collect()
    subject = await open_subject(
        variant,
        target,
        pool_size=POOL_SIZE,
        max_overflow=0,
        pool_timeout=2.0,
        max_waiting=MAX_WAITING,
    )
    engine = subject.engine
    query = text("SELECT pg_sleep(:s)")
    latencies: list[float] = []
    cpu: list[float] = []
    answered: list[float] = []
    counts = {"served": 0, "rejected": 0, "timeouts": 0}
    stop = False

    async def checkout_once(spike_start: float | None) -> bool:
        began, began_cpu = time.perf_counter(), time.thread_time()
        try:
            conn = await engine.connect()
        except PoolOverloadedError:
            now, now_cpu = time.perf_counter(), time.thread_time()
            latencies.append(now - began)
            cpu.append(now_cpu - began_cpu)
            if spike_start is not None:
                answered.append(now - spike_start)
            counts["rejected"] += 1
            return False
        except PoolTimeoutError:
            counts["timeouts"] += 1
            return False
        try:
            await conn.execute(query, {"s": HOLD})
        finally:
            await conn.close()
        counts["served"] += 1
        return True

    async def steady() -> None:
        while not stop:
            if not await checkout_once(None):
                await asyncio.sleep(BACKOFF)

    try:
        workers = [asyncio.create_task(steady()) for _ in range(POOL_SIZE)]
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        for _ in range(spikes):
            spike_start = time.perf_counter()
            await asyncio.gather(*(checkout_once(spike_start) for _ in range(SPIKE)))
            await asyncio.sleep(gap)
        seconds = time.perf_counter() - started
        stop = True
        await asyncio.gather(*workers)
        stats = subject.stats()
    finally:
        await subject.close()
    latencies.sort()
    cpu.sort()
    answered.sort()
    return {
        "spikes": spikes,
        "seconds": seconds,
        **counts,
        "reject_p50_ms": 1000 * quantile(latencies, 0.50),
        "reject_p99_ms": 1000 * quantile(latencies, 0.99),
        "reject_max_ms": 1000 * (latencies[-1] if latencies else float("nan")),
        "reject_cpu_p50_ms": 1000 * quantile(cpu, 0.50),
        "reject_cpu_p99_ms": 1000 * quantile(cpu, 0.99),
        "answered_p99_ms": 1000 * quantile(answered, 0.99),
        "answered_max_ms": 1000 * (answered[-1] if answered else float("nan")),
        "pool": stats,
    }
