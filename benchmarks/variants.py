"""The throughput variants: one ``SELECT 1`` per checkout, through each pool.

Each variant opens a fresh pool of 10 connections (no overflow) in a fresh
event loop, runs ``concurrency`` tasks in a closed loop, and measures, after a
warm-up, the ops completed and the process CPU time spent in a fixed window.
At concurrency >= 10 one core is saturated by the Python client, so
throughput is about 1 / (client CPU per op) and CPU per op is the steadier
figure (see shared/research/perf.md).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

POOL_SIZE: Final = 10
#: Long enough never to fire in a closed loop of at most 50 tasks on 10 connections.
POOL_TIMEOUT: Final = 30.0

_names = itertools.count(1)


@dataclass(frozen=True)
class Variant:
    """A pool set-up under test. ``env`` is its OpenTelemetry setting (``_otel_env``)."""

    name: str
    label: str
    env: str
    kind: str  # "asyncpg" | "psycopg" | "psycopg_pool" | "sqlalchemy" | "asyncpool"
    options: tuple[tuple[str, Any], ...] = ()
    #: Extra environment variables for the variant's worker process.
    environ: tuple[tuple[str, str], ...] = ()
    #: The driver under SQLAlchemy (kinds "sqlalchemy" and "asyncpool").
    driver: str = "asyncpg"


VARIANTS: Final[dict[str, Variant]] = {
    v.name: v
    for v in (
        Variant("asyncpg", "raw asyncpg pool (acquire, fetchval, release)", "plain", "asyncpg"),
        Variant("sa", "plain SQLAlchemy, no pre-ping", "plain", "sqlalchemy"),
        Variant(
            "sa_preping",
            "plain SQLAlchemy, pool_pre_ping=True",
            "plain",
            "sqlalchemy",
            (("pool_pre_ping", True),),
        ),
        Variant(
            "ap_default",
            "asyncpool defaults (pre-ping on, telemetry on: OTel SDK, in-memory readers)",
            "sdk",
            "asyncpool",
        ),
        Variant(
            "ap_public_record",
            "asyncpool defaults, histograms through the public Histogram.record",
            "sdk",
            "asyncpool",
            environ=(("ASYNCPOOL_OTEL_BOUND_HISTOGRAMS", "0"),),
        ),
        Variant(
            "ap_notel",
            "asyncpool, telemetry=False",
            "plain",
            "asyncpool",
            (("telemetry", False),),
        ),
        Variant(
            "ap_notel_sdk",
            "asyncpool, telemetry=False, in a process with the OTel SDK installed",
            "sdk",
            "asyncpool",
            (("telemetry", False),),
        ),
        Variant(
            "ap_noop",
            "asyncpool defaults, no SDK installed (no-op API)",
            "noop",
            "asyncpool",
        ),
        Variant(
            "ap_unset",
            "asyncpool defaults, SDK importable but no provider set (waits for one)",
            "plain",
            "asyncpool",
        ),
        Variant(
            "ap_ping_always",
            "asyncpool, telemetry=False, pre-ping on every checkout (skip window 0)",
            "plain",
            "asyncpool",
            (("telemetry", False), ("pre_ping_skip_window", 0.0)),
        ),
        # The same pools on psycopg 3 (issue 16), side by side.
        Variant(
            "pg_raw",
            "raw psycopg: 10 autocommit connections in an asyncio.Queue (no pool, no transaction)",
            "plain",
            "psycopg",
        ),
        Variant(
            "pg_pool",
            "psycopg_pool AsyncConnectionPool (with pool.connection(): execute, commit)",
            "plain",
            "psycopg_pool",
        ),
        Variant(
            "pg_sa",
            "plain SQLAlchemy on psycopg, no pre-ping",
            "plain",
            "sqlalchemy",
            driver="psycopg",
        ),
        Variant(
            "pg_ap_default",
            "asyncpool defaults on psycopg (pre-ping on, telemetry on: OTel SDK)",
            "sdk",
            "asyncpool",
            driver="psycopg",
        ),
    )
}

#: The variants every ratio is taken against.
BASELINES: Final = ("sa", "asyncpg")


def psycopg_installed() -> bool:
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return False
    return True


def targets(dsn: str) -> dict[str, str]:
    """The database as each kind wants it: libpq DSN, SQLAlchemy URLs per driver."""
    return {
        "dsn": dsn,
        "url": dsn.replace("postgresql://", "postgresql+asyncpg://", 1),
        "psycopg_url": dsn.replace("postgresql://", "postgresql+psycopg://", 1),
    }


class Subject:
    """An open pool under test: ``op()`` runs one operation; ``close()`` disposes it."""

    name: str = ""
    engine: Any = None
    pool: Any = None

    async def op(self) -> None:
        raise NotImplementedError

    async def checkout(self) -> None:
        """A checkout and checkin with no statement: the pool's own cost."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}


class AsyncpgSubject(Subject):
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def op(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def checkout(self) -> None:
        async with self.pool.acquire():
            pass  # the release still sends asyncpg's reset query

    async def close(self) -> None:
        await self.pool.close()


class PsycopgSubject(Subject):
    """Raw psycopg: a fixed set of autocommit connections handed out by a queue."""

    def __init__(self, conns: list[Any]) -> None:
        self.conns = conns
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        for conn in conns:
            self.queue.put_nowait(conn)

    async def op(self) -> None:
        conn = await self.queue.get()
        try:
            await conn.execute("SELECT 1")
        finally:
            self.queue.put_nowait(conn)

    async def checkout(self) -> None:
        self.queue.put_nowait(await self.queue.get())

    async def close(self) -> None:
        for conn in self.conns:
            await conn.close()


class PsycopgPoolSubject(Subject):
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def op(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("SELECT 1")

    async def checkout(self) -> None:
        async with self.pool.connection():
            pass

    async def close(self) -> None:
        await self.pool.close()


class EngineSubject(Subject):
    """SQLAlchemy's ``AsyncEngine``, plain or asyncpool's: the same operation for both."""

    def __init__(self, engine: Any, name: str, pooled: bool) -> None:
        from sqlalchemy import text

        self.engine = engine
        self.name = name
        self.pooled = pooled
        self.statement = text("SELECT 1")

    async def op(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(self.statement)

    async def checkout(self) -> None:
        async with self.engine.connect():
            pass  # no transaction begun: nothing is sent on checkin

    async def close(self) -> None:
        await self.engine.dispose()
        if self.pooled:
            # Detach telemetry too, so that the next cell's collection does not
            # also walk this cell's pool.
            from asyncpool.engine import pool_of

            for observer in pool_of(self.engine).state.observers:
                owner = getattr(observer, "owner", None)
                if owner is not None:
                    owner.uninstrument()

    def stats(self) -> dict[str, Any]:
        if not self.pooled:
            return {}
        import asyncpool

        snapshot = asyncpool.statistics(self.engine)
        return {
            "checkouts": snapshot.checkouts,
            "pre_pings": snapshot.pre_pings,
            "waits": snapshot.waits,
            "timeouts": snapshot.timeouts,
            "connects": snapshot.connects,
        }


def telemetry_supported() -> bool:
    """Whether ``create_pooled_engine`` has its ``telemetry`` switch (issue #4) yet."""
    import asyncpool

    try:
        import asyncpool.telemetry
    except ImportError:
        return False
    return "telemetry" in inspect.signature(asyncpool.create_pooled_engine).parameters


def asyncpool_options(variant: Variant) -> dict[str, Any]:
    """The variant's options, minus ``telemetry`` while asyncpool has no such switch."""
    options = dict(variant.options)
    if not telemetry_supported():
        options.pop("telemetry", None)
    return options


async def open_subject(
    variant: Variant,
    target: dict[str, str],
    *,
    pool_size: int = POOL_SIZE,
    max_overflow: int = 0,
    pool_timeout: float = POOL_TIMEOUT,
    **extra: Any,
) -> Subject:
    """Open ``variant``'s pool against ``target`` (``{"dsn": ..., "url": ...}``)."""
    if variant.kind == "asyncpg":
        import asyncpg

        pool = await asyncpg.create_pool(
            target["dsn"], min_size=pool_size, max_size=pool_size + max_overflow
        )
        return AsyncpgSubject(pool)
    if variant.kind == "psycopg":
        import psycopg

        conns = [
            await psycopg.AsyncConnection.connect(target["dsn"], autocommit=True)
            for _ in range(pool_size)
        ]
        return PsycopgSubject(conns)
    if variant.kind == "psycopg_pool":
        from psycopg_pool import AsyncConnectionPool

        pool = AsyncConnectionPool(
            target["dsn"],
            min_size=pool_size,
            max_size=pool_size + max_overflow,
            timeout=pool_timeout,
            open=False,
        )
        await pool.open(wait=True)
        return PsycopgPoolSubject(pool)
    url = target["psycopg_url"] if variant.driver == "psycopg" else target["url"]
    if variant.kind == "sqlalchemy":
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            **dict(variant.options),
            **extra,
        )
        return EngineSubject(engine, "", pooled=False)
    import asyncpool

    name = f"bench-{variant.name}-{next(_names)}"
    engine = asyncpool.create_pooled_engine(
        url,
        name=name,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        **asyncpool_options(variant),
        **extra,
    )
    return EngineSubject(engine, name, pooled=True)


async def closed_loop(
    op: Callable[[], Awaitable[None]],
    concurrency: int,
    warmup: float,
    window: float,
    collect: Callable[[], None] | None = None,
) -> dict[str, float]:
    """``concurrency`` tasks running ``op`` back to back, counted over ``window``.

    Counting starts after ``warmup``; CPU is the whole process's CPU time.
    ``collect`` (telemetry collection) runs at the end of the window, inside it.
    """
    done = 0
    stop = False

    async def worker() -> None:
        nonlocal done
        while not stop:
            await op()
            done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        machine0 = _machine_ticks()
        ops0, cpu0, t0 = done, time.process_time(), time.perf_counter()
        await asyncio.sleep(window)
        if collect is not None:
            collect()
        ops1, cpu1, t1 = done, time.process_time(), time.perf_counter()
        machine1 = _machine_ticks()
    finally:
        stop = True
        await asyncio.gather(*tasks)
    ops = ops1 - ops0
    elapsed = t1 - t0
    busy, steal = _machine_load(machine0, machine1)
    return {
        "ops": ops,
        "seconds": elapsed,
        "ops_s": ops / elapsed,
        "cpu_us_op": 1e6 * (cpu1 - cpu0) / ops if ops else float("nan"),
        "cpu_s_per_s": (cpu1 - cpu0) / elapsed,
        "machine_busy": busy,
        "machine_steal": steal,
    }


async def throughput_cell(
    variant: Variant,
    target: dict[str, str],
    concurrency: int,
    warmup: float,
    window: float,
    telemetry: Any = None,
    checkout_only: bool = False,
) -> dict[str, Any]:
    """One measurement: a fresh pool, a closed loop, the pool disposed.

    ``checkout_only`` runs ``async with engine.connect(): pass`` instead of a
    ``SELECT 1``: no I/O at all, so CPU per op is the pool's own cost.
    ``telemetry`` (``_otel_env.Telemetry``) is collected at the end of the
    window and summarised into the result.
    """
    gc.collect()
    subject = await open_subject(variant, target)
    op = subject.checkout if checkout_only else subject.op
    try:
        recording = telemetry is not None and telemetry.metric_reader is not None
        collect = telemetry.collect if recording else None
        result: dict[str, Any] = await closed_loop(op, concurrency, warmup, window, collect)
        result["pool"] = subject.stats()
        if recording and subject.name:
            result["telemetry"] = telemetry.harvest(subject.name)
    finally:
        await subject.close()
    return result


def _machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return (0, 0, 0)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return (total - idle, steal, total)


def _machine_load(before: tuple[int, int, int], after: tuple[int, int, int]) -> tuple[float, float]:
    """Fractions of all cores busy and stolen by the hypervisor between two readings."""
    total = after[2] - before[2]
    if total <= 0:
        return (float("nan"), float("nan"))
    return ((after[0] - before[0]) / total, (after[1] - before[1]) / total)
