"""Soak: one million checkouts of ``SELECT 1`` must leave the process's memory flat.

    python benchmarks/soak.py                          # 1,000,000 checkouts, embedded PostgreSQL
    python benchmarks/soak.py --checkouts 100000       # a shorter run
    python benchmarks/soak.py --url postgresql://user@host:5432/db
    python benchmarks/soak.py --ping-every-checkout --leak-threshold 60   # every per-checkout path

A leak of a few hundred bytes per checkout (a record, a timer, a stack, an
observer entry kept per connection) is invisible in a test and fatal in a
service that runs for weeks; a million checkouts make it show up as
hundreds of megabytes. The script warms up first (imports, statement
caches, the pool's connections), then samples the resident set size (RSS)
as it goes, and prints the growth after warm-up, the peak, and the slope
over the second half of the run, per 100,000 checkouts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path
from typing import Final

import psutil

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's asyncpool, not an installed one

from sqlalchemy import text  # noqa: E402

import asyncpool  # noqa: E402
from asyncpool.embedded import EmbeddedPostgres  # noqa: E402

MIB: Final = 1024 * 1024
SELECT_1: Final = text("SELECT 1")
#: Samples of RSS taken over the run (plus one at the end of warm-up).
SAMPLES: Final = 50


async def soak(args: argparse.Namespace, url: str) -> int:
    checkouts, tasks, pool_size, warmup = args.checkouts, args.tasks, args.pool_size, args.warmup
    engine = asyncpool.create_pooled_engine(
        url,
        name="soak",
        pool_size=pool_size,
        max_overflow=0,
        pre_ping_skip_window=0 if args.ping_every_checkout else 0.5,
        leak_threshold=args.leak_threshold,
    )
    process = psutil.Process()
    done = 0

    async def worker(share: int) -> None:
        nonlocal done
        for _ in range(share):
            async with engine.connect() as conn:
                await conn.execute(SELECT_1)
            done += 1

    async def run(total: int) -> None:
        share, extra = divmod(total, tasks)
        await asyncio.gather(*(worker(share + (i < extra)) for i in range(tasks)))

    await run(warmup)
    gc.collect()
    baseline = process.memory_info().rss
    samples: list[tuple[int, int]] = [(0, baseline)]
    started = time.perf_counter()
    done = 0
    step = max(checkouts // SAMPLES, 1)
    while done < checkouts:
        await run(min(step, checkouts - done))
        samples.append((done, process.memory_info().rss))
        print(
            f"\r{done:>10,} checkouts  rss {samples[-1][1] / MIB:7.1f} MiB",
            end="",
            file=sys.stderr,
            flush=True,
        )
    elapsed = time.perf_counter() - started
    print(file=sys.stderr)
    gc.collect()
    final = process.memory_info().rss
    stats = asyncpool.statistics(engine)
    await engine.dispose()

    peak = max(rss for _, rss in samples)
    half = [s for s in samples if s[0] >= checkouts // 2]
    slope = _slope(half) * 100_000 / 1024  # KiB per 100k checkouts
    print(f"checkouts           {checkouts:,} (after {warmup:,} warm-up)")
    print(f"tasks / pool_size   {tasks} / {pool_size}")
    print(
        f"pre-ping            {'every checkout' if args.ping_every_checkout else 'default'}"
        f", leak_threshold={args.leak_threshold}"
    )
    print(f"throughput          {checkouts / elapsed:,.0f} checkouts/s ({elapsed:.0f} s)")
    print(f"rss after warm-up   {baseline / MIB:.1f} MiB")
    print(f"rss peak            {peak / MIB:.1f} MiB")
    print(f"rss at the end      {final / MIB:.1f} MiB (after gc.collect())")
    print(f"peak growth         {(peak - baseline) / MIB:+.2f} MiB")
    print(f"second-half slope   {slope:+.1f} KiB per 100,000 checkouts")
    print(
        f"pool                checkouts={stats.checkouts:,} connects={stats.connects} "
        f"checked_out={stats.checked_out} invalidations={stats.invalidations} "
        f"pre_pings={stats.pre_pings:,}"
    )
    return 0 if stats.checked_out == 0 else 1


def _slope(points: list[tuple[int, int]]) -> float:
    """Least-squares bytes per checkout."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return cov / var if var else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkouts", type=int, default=1_000_000)
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument(
        "--ping-every-checkout",
        action="store_true",
        help="pre_ping_skip_window=0: a pre-ping on every checkout",
    )
    parser.add_argument(
        "--leak-threshold",
        type=float,
        default=None,
        help="leak detection on: a stack and a timer per checkout",
    )
    args = parser.parse_args()
    if args.url:
        return asyncio.run(soak(args, args.url))
    with EmbeddedPostgres() as server:
        return asyncio.run(soak(args, server.url()))


if __name__ == "__main__":
    sys.exit(main())
