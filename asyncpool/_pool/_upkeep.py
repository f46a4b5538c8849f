"""The pool's maintenance, in the background, so that no request pays for it.

HikariCP's housekeeper and psycopg_pool's scheduler do this; SQLAlchemy's
pool does it lazily, on a caller's checkout. On the loop that owns the pool,
driven by timers (a pending timer, unlike a pending task, leaves nothing to
complain about when a loop is closed without ceremony), ``Upkeep``:

* replaces idle connections the driver already knows are dead (a killed
  backend, a restart: their FATAL arrives while they sit idle), found
  without I/O;
* closes connections above the floor (``min_idle``, else ``pool_size``)
  that the pool did not need for ``idle_timeout`` seconds. "Did not need"
  is the fewest idle connections seen over that window (the checkout path
  keeps a low-water mark), so it works whatever the order of hand-out;
* replaces idle connections past their own lifetime: ``pool_recycle`` minus
  a share of up to ``recycle_jitter``, spread evenly (a golden-ratio
  sequence) so that connections opened together are not replaced together;
* pings idle connections unused for ``keepalive_interval``, replacing dead ones;
* keeps ``min_idle`` connections open, retrying with capped exponential
  backoff and jitter after an outage, logged once per outage.

Connect and ping run in one short task at a time; records it works on are
out of the idle queue meanwhile (they count as in use), and go back through
``park()``: to a waiter first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.util.concurrency import greenlet_spawn

from ._state import IdleDropped

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

    from ._fair import FairAsyncPool

__all__ = ["Upkeep", "lifetime_share"]

logger = logging.getLogger("asyncpool.pool")

#: The longest the maintenance sleeps: how soon a dead idle connection or a
#: missing ``min_idle`` one is noticed at worst.
HEARTBEAT: Final = 1.0
#: Idle low-water marks are kept per bucket of this many seconds.
_BUCKET: Final = 0.25
#: Refill backoff after a failed connect: first delay and cap (seconds).
BACKOFF_FIRST: Final = 0.1
BACKOFF_MAX: Final = 10.0

_GOLDEN: Final = 0.6180339887498949
_share_state = [random.random()]


def lifetime_share() -> float:
    """The next connection's share of ``recycle_jitter`` in [0, 1): a
    golden-ratio sequence from a random start, so that any ten consecutive
    connections cover the range evenly (random draws would bunch)."""
    _share_state[0] = (_share_state[0] + _GOLDEN) % 1.0
    return _share_state[0]


class Upkeep:
    """One pool's maintenance task."""

    def __init__(self, pool: FairAsyncPool) -> None:
        self._pool = pool
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._work: asyncio.Task[None] | None = None
        self._stopped = False  # for good: drain, dispose
        self._halted = False  # until a loop adopts the pool again
        # Records the work holds (out of the idle queue, or new ones with a slot).
        self._held: set[ConnectionPoolEntry] = set()
        # (bucket start, fewest idle connections seen in it)
        self._lows: collections.deque[tuple[float, int]] = collections.deque()
        self._bucket_started = 0.0
        # An outage: consecutive failed refills, when it started, next try.
        self._failures = 0
        self._outage_started = 0.0
        self._retry_at = 0.0
        self._warming = 0

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        """A warm-up opens ``min_idle`` itself: no refill meanwhile (both would)."""
        self._warming += 1
        try:
            yield
        finally:
            self._warming -= 1

    @property
    def running(self) -> bool:
        return self._timer is not None or self._work is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop`` (the pool's owner) from now on; idempotent."""
        if self._stopped or (self._loop is loop and self.running):
            return
        self._loop = loop
        self._halted = False
        self._work = None
        self._bucket_started = time.monotonic()
        self._lows.clear()
        self._schedule(0.0)

    def stop(self) -> asyncio.Task[None] | None:
        """Stop for good (drain, dispose); the work in flight, if any, is
        cancelled and returned so that an async caller can await it."""
        self._stopped = True
        return self._cancel()

    async def halt(self) -> None:
        """The owner loop is ending: stop until a loop adopts the pool again."""
        self._halted = True
        work = self._cancel()
        if work is not None:
            try:
                await work
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise

    def _cancel(self) -> asyncio.Task[None] | None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        work, self._work = self._work, None
        if work is not None and not work.done():
            work.cancel()
            return work
        return None

    def forget_dead_loop(self) -> None:
        """The owner loop is closed (or, after a fork, another process's): its
        timer and task are gone. What they held goes back without I/O: the
        records (their connections let go of) with their slots."""
        self._timer = None
        self._work = None
        self._loop = None
        pool = self._pool
        held, self._held = self._held, set()
        for rec in held:
            if rec.dbapi_connection is not None:
                rec.invalidate(IdleDropped(f"pool {pool.name!r}: owner loop closed", "loop_closed"))
            pool.park(rec)

    def _schedule(self, delay: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        # A weak reference: a pool whose engine was dropped can be collected.
        self._timer = self._loop.call_later(max(delay, 0.0), _tick, weakref.ref(self))

    # ------------------------------------------------------------------ tick

    def tick(self) -> None:
        self._timer = None
        pool = self._pool
        if self._stopped or self._halted or not pool.accepts_returns() or self._work is not None:
            return
        now = time.monotonic()
        try:
            started = self._tick_once(now)
        except Exception:
            logger.exception("pool %r: maintenance failed; it goes on", pool.name)
            started = False
        if not started:
            self._schedule(self._next_due(now) - now)

    def _tick_once(self, now: float) -> bool:
        """The no-I/O part; True when a work task was started for the rest."""
        pool = self._pool
        config = pool.state.config
        self._note_low_water(now)
        if config.idle_timeout is not None:
            self._close_unneeded(now, config.idle_timeout)
        jobs = self._due_jobs(now)
        if not jobs and not (self._missing() and now >= self._retry_at):
            return False
        assert self._loop is not None
        self._work = self._loop.create_task(
            self._run(jobs), name=f"asyncpool upkeep of pool {pool.name!r}"
        )
        self._work.add_done_callback(self._work_done)
        return True

    def _work_done(self, task: asyncio.Task[None]) -> None:
        if self._work is task:
            self._work = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("pool %r: maintenance failed", self._pool.name, exc_info=task.exception())
        if self._stopped or self._halted or self._loop is None or self._loop.is_closed():
            return
        self._schedule(0.0 if self._work is None and self._missing_now() else HEARTBEAT)

    # ------------------------------------------- records and slots it holds

    def _take(self, rec: ConnectionPoolEntry) -> bool:
        """Take an idle record out of the queue (it counts as in use); False if gone."""
        try:
            self._pool._idle.remove(rec)
        except ValueError:
            return False  # checked out meanwhile
        self._held.add(rec)
        return True

    def _give(self, rec: ConnectionPoolEntry) -> None:
        self._held.discard(rec)
        self._pool.park(rec)

    def _note_low_water(self, now: float) -> None:
        pool = self._pool
        if now - self._bucket_started >= _BUCKET:
            self._lows.append((self._bucket_started, pool.take_idle_low_water()))
            self._bucket_started = now
        window = pool.state.config.idle_timeout or 0.0
        while self._lows and self._lows[0][0] < now - window:
            self._lows.popleft()

    def _close_unneeded(self, now: float, idle_timeout: float) -> None:
        """Close idle connections above the floor that went unused for a whole window."""
        lows = self._lows
        if not lows or lows[0][0] > now - idle_timeout + _BUCKET:
            return  # not a whole window observed yet
        pool = self._pool
        unneeded = min(pool.idle_low_water, *(low for _, low in lows))
        live = pool.live_idle()
        above_floor = live + len(pool._lent) - self._floor()
        surplus = min(unneeded, above_floor, live)
        closed = 0
        # The front of the idle queue is the next handed out (FIFO) or the
        # oldest returned (LIFO): close the least recently used first.
        idle = pool._idle
        for rec in tuple(idle if not pool._pool.use_lifo else reversed(idle)):
            if closed >= surplus:
                break
            if rec.dbapi_connection is None:
                continue
            idle.remove(rec)
            closed += 1
            try:
                pool.close_record(rec)  # the slot comes free whatever happens
            except Exception:
                logger.exception("pool %r: closing an unneeded connection failed", pool.name)
                connection: Any = rec.dbapi_connection
                if connection is not None:
                    pool.driver.abort(connection.driver_connection)
        if closed:
            pool.state.counters.idle_closes += closed
            # Those were the unneeded ones: the window's marks drop with them.
            self._lows = collections.deque((t, max(low - closed, 0)) for t, low in lows)
            pool.lower_idle_low_water(len(idle))
            logger.debug(
                "pool %r: closed %d connections unused for %g s", pool.name, closed, idle_timeout
            )

    def _floor(self) -> int:
        config = self._pool.state.config
        return config.effective_min_idle

    def _missing(self) -> int:
        """Connections short of ``min_idle`` (only a set ``min_idle`` is kept)."""
        pool = self._pool
        wanted = pool.state.config.min_idle
        if not wanted or self._warming:
            return 0
        # Slots taken (lent, connecting, being cleaned) count as open.
        return max(wanted - pool.live_idle() - max(pool.checkedout(), 0), 0)

    def _missing_now(self) -> bool:
        return self._missing() > 0 and time.monotonic() >= self._retry_at

    def _due_jobs(self, now: float) -> list[tuple[str, ConnectionPoolEntry]]:
        pool = self._pool
        config = pool.state.config
        wall = time.time()
        keepalive = config.keepalive_interval
        driver = pool.driver
        jobs = []
        for rec in pool._idle:
            connection: Any = rec.dbapi_connection
            if connection is None:
                continue
            expires = rec.__dict__.get("_ap_expires")
            if keepalive is not None and driver.unsettled(connection.driver_connection):
                # Gone while idle (a killed backend, a restart: the FATAL
                # arrives while it sits there): no ping needed to know.
                jobs.append(("revive", rec))
            elif expires is not None and wall >= expires:
                jobs.append(("recycle", rec))
            elif keepalive is not None and now - pool.parked_at(rec) >= keepalive:
                jobs.append(("keepalive", rec))
        return jobs

    def _next_due(self, now: float) -> float:
        pool = self._pool
        config = pool.state.config
        due = now + HEARTBEAT
        wall = time.time()
        keepalive = config.keepalive_interval
        for rec in pool._idle:
            if rec.dbapi_connection is None:
                continue
            expires = rec.__dict__.get("_ap_expires")
            if expires is not None:
                due = min(due, now + (expires - wall))
            if keepalive is not None:
                due = min(due, pool.parked_at(rec) + keepalive)
        if self._missing():
            due = min(due, max(self._retry_at, now))
        if config.idle_timeout is not None:
            due = min(due, self._bucket_started + _BUCKET)
        return due

    # ------------------------------------------------------------------ work

    async def check_idle(self) -> int:
        """Ping every idle connection now and replace the dead ones; how many."""
        pool = self._pool
        driver = pool.driver
        timeout = pool.state.config.pre_ping_timeout

        async def check(rec: ConnectionPoolEntry) -> bool:
            # Taken here, not up front: a check cancelled before it starts
            # leaves its record in the queue.
            if rec.dbapi_connection is None or not self._take(rec):
                return False
            connection: Any = rec.dbapi_connection
            try:
                if driver.unsettled(connection.driver_connection):
                    raise ConnectionError("the driver saw it end")
                await driver.ping(connection.driver_connection, timeout)
            except Exception as exc:
                rec.invalidate(IdleDropped(f"pool {pool.name!r}: check_idle: {exc}", "idle_dead"))
                await self._reconnect(rec)
                return True
            except BaseException:
                rec.invalidate()
                self._give(rec)
                raise
            pool.note_parked(rec)
            self._give(rec)
            return False

        replaced = await asyncio.gather(*(check(rec) for rec in tuple(pool._idle)))
        return sum(replaced)

    async def _run(self, jobs: list[tuple[str, ConnectionPoolEntry]]) -> None:
        pool = self._pool
        for kind, rec in jobs:
            if not pool.accepts_returns():
                return
            if rec.dbapi_connection is None or not self._take(rec):
                continue  # checked out meanwhile
            if kind == "recycle":
                await self._replace(rec)
            elif kind == "revive":
                rec.invalidate(
                    IdleDropped(f"pool {pool.name!r}: an idle connection died", "idle_dead")
                )
                await self._reconnect(rec)
            else:
                await self._keepalive(rec)
        await self._refill()

    async def _replace(self, rec: ConnectionPoolEntry) -> None:
        pool = self._pool
        pool.state.counters.recycles += 1
        pool.state.counters.background_recycles += 1
        try:
            rec.close()
        except Exception:
            logger.exception("pool %r: closing a connection past its lifetime failed", pool.name)
        await self._reconnect(rec)

    async def _keepalive(self, rec: ConnectionPoolEntry) -> None:
        pool = self._pool
        dbapi_connection: Any = rec.dbapi_connection
        pool.state.counters.keepalive_pings += 1
        try:
            await pool.driver.ping(
                dbapi_connection.driver_connection, pool.state.config.pre_ping_timeout
            )
        except Exception as exc:
            pool.state.counters.keepalive_failures += 1
            failure = IdleDropped(
                f"keepalive failed on pool {pool.name!r}: {type(exc).__name__}", "keepalive"
            )
            failure.__cause__ = exc
            logger.info("pool %r: an idle connection failed its keepalive (%s)", pool.name, exc)
            rec.invalidate(failure)
            await self._reconnect(rec)
            return
        except BaseException:
            rec.invalidate()
            self._give(rec)
            raise
        pool.note_parked(rec)
        self._give(rec)

    async def _reconnect(self, rec: ConnectionPoolEntry) -> bool:
        """Open a connection into an empty record it holds, then hand it back; an
        empty record goes back too (its slot stays; checkout or refill retries).
        A connect cut short (an error, or the loop's cancel-all) may have left
        a half-set-up connection in the record: it is closed, never handed out."""
        try:
            await greenlet_spawn(_refill, rec)
        except BaseException as exc:
            if rec.dbapi_connection is not None:
                rec.invalidate()
            if not isinstance(exc, Exception):
                raise
            self._failed(exc)
            return False
        else:
            self._succeeded()
            self._pool.note_parked(rec)
            return True
        finally:
            self._give(rec)

    async def _refill(self) -> None:
        pool = self._pool
        counters = pool.state.counters
        while self._missing() and pool.accepts_returns() and time.monotonic() >= self._retry_at:
            shell = next((rec for rec in pool._idle if rec.dbapi_connection is None), None)
            if shell is not None:
                if not self._take(shell):
                    continue
            elif pool.take_slot():
                shell = pool.empty_record()  # holds the slot from now on
                self._held.add(shell)
            else:
                return  # every slot is taken
            if not await self._reconnect(shell):
                return
            counters.refills += 1

    def _failed(self, error: BaseException) -> None:
        pool = self._pool
        now = time.monotonic()
        pool.state.counters.refill_failures += 1
        if self._failures == 0:
            self._outage_started = now
            pool.state.counters.outages += 1
            logger.warning(
                "pool %r: cannot open connections (%s: %s); retrying in the background with "
                "backoff up to %g s",
                pool.name,
                type(error).__name__,
                error,
                BACKOFF_MAX,
            )
        self._failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1))
        self._retry_at = now + delay * random.uniform(0.5, 1.0)

    def _succeeded(self) -> None:
        if self._failures:
            logger.warning(
                "pool %r: connected again after %d failed attempts over %.1f s",
                self._pool.name,
                self._failures,
                time.monotonic() - self._outage_started,
            )
        self._failures = 0
        self._retry_at = 0.0


def _tick(upkeep: weakref.ref[Upkeep]) -> None:
    alive = upkeep()
    if alive is not None:
        alive.tick()


def _refill(rec: ConnectionPoolEntry) -> ConnectionPoolEntry:
    rec.get_connection()  # type: ignore[attr-defined]  # reconnects an empty record
    return rec
