"""Sync code calling async database code: ``asyncio.run`` per call vs ``asyncpool.run``.

    python benchmarks/run_vs_asyncio.py                  # embedded PostgreSQL
    python benchmarks/run_vs_asyncio.py --url postgresql://user@host:5432/db
    python benchmarks/run_vs_asyncio.py --calls 2000

Without ``--url`` the database is ``ASYNCPOOL_BENCH_DSN``, else
``ASYNCPOOL_TEST_DSN``, else an embedded server (as ``run.py``). N sequential
calls of one job (``SELECT 1`` on a checked-out connection) on one engine per
variant, as a Celery task or a Django view would make them: calls per
second, and connections opened per call (``statistics(engine).connects``).
``asyncio.run`` makes a new loop per call, so the pool must let go of the
previous loop's connections and connect again; ``asyncpool.run`` keeps the
thread's loop, and the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: E402

import asyncpool  # noqa: E402

Runner = Callable[[Coroutine[Any, Any, Any]], Any]

VARIANTS: Final[dict[str, Runner]] = {
    "asyncio.run": asyncio.run,
    "uvloop.run": uvloop.run,
    "asyncpool.run": asyncpool.run,
    "asyncpool.run(loop_factory=uvloop)": lambda coro: asyncpool.run(
        coro, loop_factory=uvloop.new_event_loop
    ),
}


async def job(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


def measure(name: str, run: Runner, url: str, calls: int) -> dict[str, Any]:
    engine = asyncpool.create_pooled_engine(url, name=f"bench-{name}", pool_size=5)
    run(job(engine))  # warm-up: import paths, the first connect (not counted)
    before = asyncpool.statistics(engine).connects
    start = time.perf_counter()
    for _ in range(calls):
        run(job(engine))
    elapsed = time.perf_counter() - start
    connects = asyncpool.statistics(engine).connects - before
    run(engine.dispose())
    asyncpool.runner.close()  # the next variant may ask for another loop factory
    return {"calls_per_s": calls / elapsed, "connects": connects}


def main() -> None:
    from benchmarks.run import database

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="PostgreSQL URL (default: see above)")
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    url = args.url or os.environ.get("ASYNCPOOL_BENCH_DSN") or os.environ.get("ASYNCPOOL_TEST_DSN")
    with database(url) as (dsn, description):
        print(f"database: {description}; {args.calls} sequential calls per variant\n")
        rows = {name: measure(name, run, dsn, args.calls) for name, run in VARIANTS.items()}
    base = rows["asyncio.run"]["calls_per_s"]
    print("| variant | calls/s | vs asyncio.run | connects | connects per call |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(
            f"| `{name}` | {row['calls_per_s']:,.0f} | {row['calls_per_s'] / base:.1f}x "
            f"| {row['connects']} | {row['connects'] / args.calls:.3f} |"
        )


if __name__ == "__main__":
    main()
