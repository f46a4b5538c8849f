"""The load driver: open-loop arrivals against a real pool, sampled several times a second.

Every request is its own task, started at its arrival time whatever happens
to earlier ones; it checks a connection out, runs the profile's statement and
gives the connection back. A sampler reads ``statistics(engine)`` every
``interval`` and hands each ``Sample`` to the view.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import text

from ..engine import create_pooled_engine
from ..errors import PoolOverloadedError, PoolTimeoutError
from ..stats import statistics
from ._series import (
    ERROR,
    REJECTED,
    SERVED,
    TIMED_OUT,
    UNFINISHED,
    RequestRecord,
    Run,
    Sample,
    quantile,
)

__all__ = ["drive"]

#: Windowed values (arrival rate, wait quantiles) cover this many seconds.
WINDOW: Final = 1.0

#: After the last arrival, requests get this long beyond their pool_timeout and
#: hold time to finish before they are cancelled and counted as unfinished.
DRAIN_GRACE: Final = 10.0

OnSample = Callable[[Run, Sample], None]


async def drive(url: str, run: Run, *, on_sample: OnSample, interval: float = 0.1) -> Run:
    """Drive ``run.profile`` through a fresh engine made from ``run.config``; fill ``run``.

    The engine is disposed at the end, whatever happened.
    """
    engine = create_pooled_engine(url, run.config)
    try:
        return await _Driver(engine, run, on_sample, interval).run()
    finally:
        await engine.dispose()


class _Driver:
    def __init__(self, engine: Any, run: Run, on_sample: OnSample, interval: float) -> None:
        self.engine = engine
        self.profile = profile = run.profile
        self.interval = interval
        self.on_sample = on_sample
        self.run_record = run
        if profile.sql is None:
            self.statement = text("SELECT pg_sleep(:hold)")
            self.params: dict[str, Any] = {"hold": profile.hold}
        else:
            self.statement = text(profile.sql)
            self.params = {}
        self.loop = asyncio.get_running_loop()
        self.start = 0.0
        self.tasks: set[asyncio.Task[None]] = set()
        self.waiting_since: dict[int, float] = {}
        self.resolved: collections.deque[tuple[float, float]] = collections.deque()
        self.arrived: collections.deque[float] = collections.deque()
        self.totals: collections.Counter[str] = collections.Counter()
        self.connects_before = statistics(engine).connects  # a warm-up's, if any

    def now(self) -> float:
        return self.loop.time() - self.start

    async def run(self) -> Run:
        arrivals = self.profile.arrival_times()
        finished = asyncio.Event()
        self.start = self.loop.time()
        wall = time.perf_counter()
        sampler = asyncio.create_task(self._sample_until(finished))
        try:
            for at in arrivals:
                delay = at - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(self._request(self.now()))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            await self._drain()
        finally:
            finished.set()
            await sampler
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.run_record.elapsed = time.perf_counter() - wall
        return self.run_record

    async def _drain(self) -> None:
        config = self.run_record.config
        bound = config.pool_timeout + config.connect_timeout + 5 * self.profile.hold + DRAIN_GRACE
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=bound)

    async def _request(self, arrival: float) -> None:
        record = RequestRecord(arrival)
        self.run_record.requests.append(record)
        self.arrived.append(arrival)
        try:
            conn = await self._checkout(record)
            if conn is None:
                return
            got = arrival + (record.wait or 0.0)
            try:
                await conn.execute(self.statement, self.params)
                record.outcome = SERVED
            except Exception as exc:
                record.outcome = ERROR
                self._note_error(exc)
            finally:
                try:
                    await conn.close()
                finally:
                    record.hold = self.now() - got
        except asyncio.CancelledError:
            record.outcome = UNFINISHED
            raise
        except Exception as exc:  # giving the connection back failed
            record.outcome = ERROR
            self._note_error(exc)
        finally:
            self.totals[record.outcome] += 1

    async def _checkout(self, record: RequestRecord) -> Any:
        """The connection, or None when the pool said no (the outcome is recorded)."""
        key = id(record)
        self.waiting_since[key] = record.arrival
        try:
            conn = await self.engine.connect()
        except Exception as exc:
            record.wait = self.now() - record.arrival
            if isinstance(exc, PoolOverloadedError):
                record.outcome = REJECTED
            elif isinstance(exc, PoolTimeoutError):
                record.outcome = TIMED_OUT
            else:
                record.outcome = ERROR
                self._note_error(exc)
                return None
            self.resolved.append((self.now(), record.wait))
            return None
        finally:
            self.waiting_since.pop(key, None)
        record.wait = self.now() - record.arrival
        self.resolved.append((self.now(), record.wait))
        return conn

    def _note_error(self, exc: Exception) -> None:
        kind = type(exc).__name__
        self.run_record.errors[kind] += 1
        if self.run_record.first_error is None:
            orig = getattr(exc, "orig", None) or exc
            self.run_record.first_error = f"{type(orig).__name__}: {orig}".splitlines()[0][:300]

    async def _sample_until(self, finished: asyncio.Event) -> None:
        deadline = self.loop.time()
        while True:
            sample = self._sample()
            self.run_record.samples.append(sample)
            self.on_sample(self.run_record, sample)
            if finished.is_set():
                return
            deadline += self.interval
            try:
                await asyncio.wait_for(finished.wait(), max(deadline - self.loop.time(), 0))
            except TimeoutError:
                pass

    def _sample(self) -> Sample:
        now = self.now()
        horizon = now - WINDOW
        while self.resolved and self.resolved[0][0] < horizon:
            self.resolved.popleft()
        while self.arrived and self.arrived[0] < horizon:
            self.arrived.popleft()
        waits = sorted(w for _, w in self.resolved)
        stats = statistics(self.engine)
        totals = self.totals
        return Sample(
            t=now,
            offered=self.profile.rate_at(now),
            arrival_rate=len(self.arrived) / min(max(now, 1e-3), WINDOW),
            checked_out=stats.checked_out,
            idle=stats.idle,
            overflow=stats.overflow,
            waiting=stats.waiting,
            size=stats.size,
            connects=stats.connects - self.connects_before,
            wait_p50=quantile(waits, 0.50),
            wait_p99=quantile(waits, 0.99),
            wait_max=waits[-1] if waits else None,
            oldest_waiter=now - min(self.waiting_since.values(), default=now),
            served=totals[SERVED],
            timed_out=totals[TIMED_OUT],
            rejected=totals[REJECTED],
            errors=totals[ERROR],
            in_flight=len(self.run_record.requests) - sum(totals.values()),
        )
