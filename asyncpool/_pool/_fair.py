"""The fair asyncio pool: SQLAlchemy's pool hooks, checkout and hand-off.

This package is the one place that touches SQLAlchemy's private pool API
(``_do_get``, ``_do_return_conn``, ``_close_connection``, ``_overflow``).
``FairAsyncPool`` replaces the checkout and checkin halves of
``AsyncAdaptedQueuePool``:

* **Fair hand-off.** A returned connection goes straight to the oldest
  waiter; a newcomer takes an idle connection only when nobody waits. So no
  caller can overtake a waiter and nobody starves (SQLAlchemy's queue lets a
  ``get_nowait()`` barge past woken waiters).
* **Bounded pre-ping.** ``SELECT 1`` on the simple protocol (no transaction, no
  prepared statement), bounded by ``pre_ping_timeout``, skipped for
  connections returned less than ``pre_ping_skip_window`` ago unless the
  driver or a recent disconnect gives reason to doubt them. A failed ping
  replaces the connection; the caller never sees it.
* **Bounded waiting.** ``max_waiting`` refuses at once instead of queueing.
* **Only clean connections go back** (``_cleanup.py``): one whose state is
  unclear is cancelled on the server, rolled back, and reused or closed, in a
  task of the pool's own, while its slot stays taken.
* **Loop ownership** (``_loops.py``): the pool belongs to the loop that first
  used it; a closed owner is let go of without touching it.

Whatever touches the driver's internals is behind ``asyncpool._drivers``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, Pool
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util import queue as sqla_queue

from .._drivers import ConnectionState, Driver, driver_for
from ..config import PoolConfig
from ..errors import PoolClosedError, PoolOverloadedError, PoolTimeoutError
from . import _loops
from ._cleanup import Cleanup
from ._leaks import LeakWatch
from ._state import (
    OwnerLoopClosed,
    PoolState,
    PrePingFailed,
    ReturnedUnclean,
    ended_by_shutdown,
    invalidation_reason,
    next_pool_name,
)
from ._upkeep import Upkeep, lifetime_share

try:  # SQLAlchemy 2.1
    from sqlalchemy.util.concurrency import await_
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util.concurrency import await_only as await_
from sqlalchemy.util.concurrency import greenlet_spawn, in_greenlet

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection

__all__ = ["FairAsyncPool"]

logger = logging.getLogger("asyncpool.pool")

#: Invalidations after which a connection may be cleaned and reused: only its
#: state was unclear (its caller gave up mid-statement), not the connection.
_UNCLEAR_STATE_REASONS: Final = frozenset({"cancelled", "timeout"})

#: PostgreSQL 14 added ``client_connection_check_interval``.
_CHECK_INTERVAL_SINCE: Final = 140000


class _WaitTimedOut(Exception):
    """Set on a waiter's future when ``pool_timeout`` expires."""


#: SQLAlchemy's own ``Pool._creator`` property, re-used by the override below.
_BASE_CREATOR: Final[Any] = Pool.__dict__["_creator"]

#: Handed to a waiter instead of a record: "a connection slot is yours, open one".
_SLOT: Final = object()

#: Connects whose caller gave up: held here until they finish (see _open_record).
_connect_tasks: Final[set[asyncio.Task[Any]]] = set()


class _IdleQueue(sqla_queue.QueueCommon[ConnectionPoolEntry]):
    """Idle records. Only touched from the owning loop's thread, so no locks."""

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        self.maxsize = maxsize
        self.use_lifo = use_lifo
        self.items: collections.deque[ConnectionPoolEntry] = collections.deque()

    def empty(self) -> bool:
        return not self.items

    def full(self) -> bool:
        return len(self.items) >= self.maxsize

    def qsize(self) -> int:
        return len(self.items)

    def put(
        self, item: ConnectionPoolEntry, block: bool = True, timeout: float | None = None
    ) -> None:
        if len(self.items) >= self.maxsize:
            raise sqla_queue.Full()
        self.items.append(item)

    def get(self, block: bool = True, timeout: float | None = None) -> ConnectionPoolEntry:
        if not self.items:
            raise sqla_queue.Empty()
        return self.items.pop() if self.use_lifo else self.items.popleft()


class FairAsyncPool(AsyncAdaptedQueuePool):
    """``AsyncAdaptedQueuePool`` with FIFO hand-off, bounded pre-ping and waiting,
    and server-side cleanup of connections whose state is unclear."""

    _queue_class = _IdleQueue
    _pool: _IdleQueue

    def __init__(
        self,
        creator: Any,
        asyncpool_state: PoolState | None = None,
        **kw: Any,
    ) -> None:
        first = kw.get("_dispatch") is None
        pre_ping = kw.pop("pre_ping", False)
        super().__init__(creator, **kw)
        if asyncpool_state is None:
            # The class used on its own (poolclass=FairAsyncPool): SQLAlchemy's
            # settings, and its pool_pre_ping as ours.
            config = PoolConfig(
                pool_size=self._pool.maxsize,
                max_overflow=max(self._max_overflow, 0),
                pool_timeout=self._timeout,
                pre_ping=bool(pre_ping),
                idle_timeout=None,  # SQLAlchemy's: overflow connections close when returned
            )
            asyncpool_state = PoolState(config, self._orig_logging_name or next_pool_name())
        self._state = asyncpool_state
        self._counters = asyncpool_state.counters
        config = asyncpool_state.config
        self._ping_enabled = config.pre_ping
        self._ping_timeout = config.pre_ping_timeout
        self._ping_skip = config.pre_ping_skip_window
        self._max_waiting = config.max_waiting
        self._session_settings = _session_settings(config)
        self._driver: Driver = driver_for(self._dialect)
        self._idle = self._pool.items
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._foreign_connections_possible = False
        self._checkout_started: dict[ConnectionPoolEntry, float] = {}
        threshold = config.leak_threshold
        self._leaks = None if threshold is None else LeakWatch(asyncpool_state, threshold)
        self._cleanup = Cleanup(self)
        self._upkeep = Upkeep(self)
        capacity = config.idle_capacity
        self._idle_capacity: float = math.inf if capacity is None else capacity
        #: Fewest idle connections since the maintenance last looked (it
        #: closes what a whole ``idle_timeout`` window did not need).
        self._idle_low = 0
        #: Each connection's lifetime: ``pool_recycle`` less its jitter share.
        self._recycle_jitter = config.recycle_jitter * max(self._recycle, 0)
        self._shrinking = False  # above the bound after resize(): shed returns
        # Lent-out records, so a drain can terminate stragglers and a forked
        # child can let go of every inherited connection.
        self._lent: set[ConnectionPoolEntry] = set()
        self._returned: asyncio.Event | None = None
        self._disposed = False  # engine.dispose() replaced this pool: park nothing more
        if first:
            # Listeners follow the pool into recreate() through _dispatch, so
            # register once, on the first pool of the engine.
            event.listen(self, "invalidate", asyncpool_state.on_invalidate)

    # ----------------------------------------------------------------- identity

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def state(self) -> PoolState:
        return self._state

    @property
    def driver(self) -> Driver:
        return self._driver

    @property
    def owner_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def __repr__(self) -> str:
        return (
            f"<FairAsyncPool {self.name!r} size={self._pool.maxsize} "
            f"overflow={self._max_overflow} checked_out={self.checkedout()} "
            f"idle={len(self._idle)} waiting={len(self._waiters)}>"
        )

    def recreate(self) -> FairAsyncPool:
        self.logger.info("Pool recreating")
        # Replaced (engine.dispose(), a fork): connections still lent out
        # are closed when they come back, never parked in the old pool.
        self._disposed = True
        work = self._upkeep.stop()
        if work is not None and in_greenlet():  # engine.dispose(): await it
            with contextlib.suppress(BaseException):
                await_(asyncio.wait({work}))
        return self.__class__(
            self._creator,
            asyncpool_state=self._state,
            pool_size=self._pool.maxsize,
            max_overflow=self._max_overflow,
            use_lifo=self._pool.use_lifo,
            timeout=self._timeout,
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    # --------------------------------------------------------------- read-outs

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def max_size(self) -> int | None:
        """The most connections it may open; ``None`` with ``max_overflow=-1`` (no limit)."""
        if self._max_overflow == -1:
            return None
        return self._pool.maxsize + self._max_overflow

    def loop_count(self) -> int:
        """Live event loops served: 1 once a live loop owns the pool, else 0."""
        return int(self._loop is not None and not self._loop.is_closed())

    @property
    def cleaning(self) -> int:
        """Connections being cancelled, rolled back or closed; each holds its slot."""
        return len(self._cleanup)

    @property
    def leak_timers_armed(self) -> int:
        """Leak timers running now (one per lent connection with leak detection on)."""
        return 0 if self._leaks is None else len(self._leaks)

    def live_idle(self) -> int:
        """Idle records that hold an open connection (records can be empty shells).

        Iterates a snapshot: metric exporters call this from their own thread.
        """
        return sum(1 for rec in tuple(self._idle) if rec.dbapi_connection is not None)

    def invalidate_idle(self, exception: BaseException) -> int:
        """Invalidate every idle connection now (aborted, no round trip); how many.

        For errors that condemn the whole server (25006 after a failover):
        with SQLAlchemy's pool-wide invalidation, checked-out connections are
        replaced when next checked out; the idle ones go at once.
        """
        dropped = 0
        for rec in tuple(self._idle):
            if rec.dbapi_connection is not None:
                rec.invalidate(exception)
                dropped += 1
        return dropped

    # ---------------------------------------------------------------- checkout

    def _do_get(self) -> ConnectionPoolEntry:
        if self._loop is not asyncio.get_running_loop():
            self._loop = _loops.adopt_running_loop(self)
            self._cleanup.watch_loop()
            self._upkeep.start(self._loop)
        if self._state.closed:
            raise PoolClosedError(f"pool {self.name!r} is closed; no new checkouts are accepted")
        started = time.perf_counter()
        waited = False
        idle = self._idle
        if idle and not self._waiters:
            rec = idle.pop() if self._pool.use_lifo else idle.popleft()
            if len(idle) < self._idle_low:
                self._idle_low = len(idle)
        elif not self._waiters and (
            self._overflow < self._max_overflow or self._max_overflow == -1  # -1: no limit
        ):
            self._overflow += 1
            self._idle_low = 0
            rec = self._open_record()
        else:
            waited = True
            rec = self._wait(started)
        # The two checks every checkout makes, inline (they run thousands of
        # times a second; the calls cost more than the tests): is the
        # connection due for replacement, and does it need a pre-ping?
        if rec.dbapi_connection is not None:
            born = rec.starttime  # type: ignore[attr-defined]
            if (
                (self._recycle > -1 and time.time() - born > self._recycle)
                or self._invalidate_time > born
                or rec._soft_invalidate_time > born  # type: ignore[attr-defined]
            ):
                self._drop_stale(rec)
        ping_error = None
        if self._ping_enabled:
            # (connection, its driver connection, when) as it was parked; a
            # connection opened since (None, or another) is fresh: no ping.
            # Inside the skip window, ping anyway when the driver sees the
            # connection unsettled (a backend killed while idle pushes its
            # FATAL before the socket closes) or a disconnect was seen since
            # it was parked (a restart, a failover).
            parked = rec.__dict__.get("_ap_parked")
            if parked is not None and parked[0] is rec.dbapi_connection:
                if (
                    time.monotonic() - parked[2] >= self._ping_skip
                    or parked[2] <= self._state.doubt_since
                    or self._driver.unsettled(parked[1])
                ):
                    ping_error = self._ping(rec, parked[1])
        if rec.dbapi_connection is None:  # invalidated earlier, or by the ping
            rec = self._open_record(rec)
        self._counters.checkouts += 1
        self._lent.add(rec)
        rec._ap_holder = asyncio.current_task()  # type: ignore[attr-defined]  # named by ConcurrentUseError
        observers = self._state.observers
        if observers:
            now = time.perf_counter()
            self._checkout_started[rec] = now  # for the use time at checkin
            for observer in observers:
                observer.checked_out(now - started, waited, ping_error)
        if self._leaks is not None:
            self._leaks.start(self._loop, rec)
        return rec

    def _open_record(self, rec: ConnectionPoolEntry | None = None) -> ConnectionPoolEntry:
        """Open a connection: a new record in a slot already counted in
        ``_overflow``, or into ``rec``, an empty record (invalidated earlier).

        The connect runs in a task of its own that the caller's cancellation
        does not reach: a caller that gives up mid-connect (a client
        disconnect, a deadline shorter than a handshake) leaves the new
        connection to the next waiter or the idle pool instead of throwing it
        away, so a storm of short deadlines cannot keep the pool from ever
        opening one, and asyncpg is never cancelled halfway through a
        handshake. ``connect_timeout`` bounds the task.
        """
        assert self._loop is not None
        opener = self._create_connection if rec is None else functools.partial(_refill, rec)
        task = self._loop.create_task(greenlet_spawn(opener))
        try:
            opened: ConnectionPoolEntry = await_(asyncio.shield(task))
        except BaseException:
            settle = functools.partial(self._settle_connect, rec)
            if task.done():
                settle(task)  # the connect failed: free the slot or the record
            else:
                _connect_tasks.add(task)
                task.add_done_callback(settle)
            raise
        return opened

    def _settle_connect(
        self, rec: ConnectionPoolEntry | None, task: asyncio.Task[ConnectionPoolEntry]
    ) -> None:
        """A connect failed, or finished after its caller left: pool it or free its place."""
        _connect_tasks.discard(task)
        error = asyncio.CancelledError() if task.cancelled() else task.exception()
        try:
            if error is None:
                self._do_return_conn(task.result())
            elif rec is None:
                self.release_slot()
            else:
                rec._checkin_failed(error, _fairy_was_created=False)  # type: ignore[attr-defined]
        except Exception:
            # Run by the event loop as a callback: a failing user listener
            # (checkin, close, invalidate) must not cost the pool its slot.
            logger.exception("pool %r: settling a finished connect failed", self.name)
            if rec is None:
                self.release_slot()

    def _wait(self, started: float) -> ConnectionPoolEntry:
        counters = self._counters
        if (
            self._max_waiting
            and len(self._waiters) >= self._max_waiting
            # waiters that timed out or were cancelled but have not run yet
            and sum(1 for w in self._waiters if not w.done()) >= self._max_waiting
        ):
            counters.rejected += 1
            error = self._timeout_error(PoolOverloadedError, 0.0, rejected=True)
            self._notify_failed(0.0, error)
            raise error
        loop = self._loop
        assert loop is not None
        waiter = loop.create_future()
        self._waiters.append(waiter)
        counters.waits += 1
        timer = loop.call_later(self._timeout, _expire, waiter)
        try:
            got = await_(waiter)
        except BaseException as exc:
            timer.cancel()
            self._forget_waiter(waiter)
            waited = time.perf_counter() - started
            self._count_wait(waited)
            if isinstance(exc, _WaitTimedOut):
                counters.timeouts += 1
                error = self._timeout_error(PoolTimeoutError, waited)
                self._notify_failed(waited, error)
                raise error from None
            raise
        timer.cancel()
        self._count_wait(time.perf_counter() - started)
        if got is _SLOT:
            return self._open_record()
        rec: ConnectionPoolEntry = got
        return rec

    def _forget_waiter(self, waiter: asyncio.Future[Any]) -> None:
        """Drop a waiter that gave up; pass on anything handed to it meanwhile."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            got = waiter.result()
            if got is _SLOT:
                self.release_slot()
            else:
                self.park(got)
            return
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _count_wait(self, waited: float) -> None:
        counters = self._counters
        counters.wait_seconds_total += waited
        if waited > counters.wait_seconds_max:
            counters.wait_seconds_max = waited

    def _timeout_error(
        self, cls: type[PoolTimeoutError], waited: float, *, rejected: bool = False
    ) -> PoolTimeoutError:
        size, overflow = self._pool.maxsize, self._max_overflow
        out, waiting = self.checkedout(), len(self._waiters)
        if rejected:
            message = (
                f"pool {self.name!r} refused a checkout at once: {waiting} callers already wait "
                f"(max_waiting={self._max_waiting}); {out} of {size + overflow} connections are "
                f"checked out (pool_size={size}, max_overflow={overflow})"
            )
        else:
            message = (
                f"pool {self.name!r} timed out after {waited:.2f} s waiting for a connection "
                f"(pool_timeout={self._timeout:g}): {out} of {size + overflow} connections are "
                f"checked out (pool_size={size}, max_overflow={overflow}), {waiting} other "
                f"callers waiting"
            )
        cleaning = len(self._cleanup)
        if cleaning and not rejected:
            message += f"; {cleaning} of them being cleaned up on the server"
        return cls(
            message,
            pool_name=self.name,
            pool_size=size,
            max_overflow=overflow,
            checked_out=out,
            waiting=waiting,
            waited=waited,
        )

    def _notify_failed(self, waited: float, error: BaseException) -> None:
        for observer in self._state.observers:
            observer.checkout_failed(waited, error)

    # ----------------------------------------------------------------- pre-ping

    def _ping(self, rec: ConnectionPoolEntry, driver_connection: Any) -> BaseException | None:
        """Ping a reused connection; on failure replace it. Returns the failure, if any."""
        self._counters.pre_pings += 1
        try:
            await_(self._driver.ping(driver_connection, self._ping_timeout))
        except Exception as exc:
            self._counters.pre_ping_failures += 1
            failure = PrePingFailed(f"pre-ping failed on pool {self.name!r}: {type(exc).__name__}")
            failure.__cause__ = exc
            logger.info(
                "pool %r: pre-ping failed (%s: %s); replacing the connection",
                self.name,
                type(exc).__name__,
                exc,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            rec.invalidate(failure)
            return exc
        except BaseException as exc:
            # Cancelled mid-ping: the connection's state is unknown. Abort it
            # and give the slot back now; nothing else holds this record.
            rec._checkin_failed(exc, _fairy_was_created=False)  # type: ignore[attr-defined]
            raise
        return None

    def _drop_stale(self, rec: ConnectionPoolEntry) -> None:
        """Close a connection SQLAlchemy would replace on this checkout.

        ``_do_get`` found it too old (``pool_recycle``) or older than a
        pool-wide or soft invalidation: closing it here (no round trip) lets
        ``_open_record`` reconnect in its shielded task, instead of
        SQLAlchemy reconnecting in the caller's task where a cancellation
        would cut the handshake.
        """
        born: float = rec.starttime  # type: ignore[attr-defined]
        if self._recycle > -1 and time.time() - born > self._recycle:
            self._counters.recycles += 1
        rec.close()

    # ------------------------------------------------------------------ checkin

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        self._lent.discard(record)
        record._ap_holder = None  # type: ignore[attr-defined]
        if self._checkout_started:
            started = self._checkout_started.pop(record, None)
            if started is not None:
                use = time.perf_counter() - started
                for observer in self._state.observers:
                    observer.checked_in(use)
        if self._leaks is not None:
            self._leaks.stop(record)
        if self._cleanup and self._cleanup.note_returned(record):
            return  # its connection is being cleaned: the slot stays taken
        if self._foreign_connections_possible:
            _loops.drop_if_foreign(self, record)
        dbapi_connection: Any = record.dbapi_connection
        if dbapi_connection is not None:
            driver_connection = dbapi_connection.driver_connection
            # Only clean connections go back: one given back inside a
            # transaction, mid-statement or broken is put in order first.
            state = self._driver.state(driver_connection)
            if state is not ConnectionState.IDLE:
                self._give_back_unclean(record, state)
                return
            # For the pre-ping's skip window and the maintenance's idle clocks.
            record._ap_parked = (  # type: ignore[attr-defined]
                dbapi_connection,
                driver_connection,
                time.monotonic(),
            )
        else:
            record._ap_parked = None  # type: ignore[attr-defined]
        self.park(record)

    def _give_back_unclean(self, record: ConnectionPoolEntry, state: ConnectionState) -> None:
        if state is ConnectionState.CLOSED:
            # Not an idle connection any more: count it as gone, keep the slot.
            record.invalidate(ReturnedUnclean(f"pool {self.name!r}: closed", "returned_closed"))
            self.park(record)
        elif self._loop is asyncio._get_running_loop():
            self._cleanup.give_back(record, state)
        else:  # no loop of ours to clean it on (garbage collection, shutdown)
            record.invalidate(ReturnedUnclean(f"pool {self.name!r}: {state.value}", state.value))
            self.park(record)

    def park(self, record: ConnectionPoolEntry) -> None:
        """A clean record (or an empty one) is free: to the oldest waiter, else
        idle, else closed and its slot freed."""
        if self._state.closed:
            self.reject_waiters()  # shutting down: nobody is served any more
        if self._shrinking:
            self._shed(record)
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(record)
                return
        if len(self._idle) < self._idle_capacity and self.accepts_returns():
            self._idle.append(record)
            return
        try:
            record.close()
        except Exception:
            # A failing user close listener: the connection is gone all the
            # same, and the slot must come free exactly once.
            logger.exception("pool %r: closing a returned connection failed", self.name)
        finally:
            self.release_slot()

    def accepts_returns(self) -> bool:
        """False once shut down or replaced: returned connections are closed."""
        return not (self._state.closed or self._disposed)

    def release_slot(self) -> None:
        """A connection slot came free: give it to the oldest waiter, else shrink."""
        if self._state.closed:
            self.reject_waiters()
        if self._shrinking:  # above a smaller resize(): the slot goes, no waiter gets it
            self._overflow -= 1
            self._shrinking = self._over_bound()
            if self._returned is not None and self.checkedout() <= 0:
                self._returned.set()
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(_SLOT)
                return
        self._overflow -= 1
        if self._returned is not None and self.checkedout() <= 0:
            self._returned.set()

    def resize(self, config: PoolConfig) -> None:
        """New ``pool_size`` and ``max_overflow`` (validated in ``config``): new
        slots go to waiters at once; above the new bound, idle connections
        close now and lent ones when they come back. Owner loop's thread only."""
        old_size = self._pool.maxsize
        self._state.config = config
        self._pool.maxsize = config.pool_size
        # checkedout() is maxsize - idle + _overflow: keep it what it is.
        self._overflow -= config.pool_size - old_size
        self._max_overflow = config.max_overflow
        capacity = config.idle_capacity
        self._idle_capacity = math.inf if capacity is None else capacity
        self._recycle_jitter = config.recycle_jitter * max(self._recycle, 0)
        self._shrinking = self._over_bound()
        while self._shrinking and self._idle:
            self._shed(self._idle.popleft())
        while self._waiters and self.take_slot():
            self.release_slot()  # to the oldest waiter still waiting, else back

    def _over_bound(self) -> bool:
        return self._max_overflow != -1 and self._overflow > self._max_overflow

    def _shed(self, record: ConnectionPoolEntry) -> None:
        """Close a connection above the bound after a shrinking ``resize()``."""
        try:
            record.close()
        except Exception:
            logger.exception("pool %r: closing a connection above the new size failed", self.name)
        self._overflow -= 1
        self._shrinking = self._over_bound()
        if self._returned is not None and self.checkedout() <= 0:
            self._returned.set()

    def empty_record(self) -> ConnectionPoolEntry:
        """A record with no connection yet, for a slot already taken."""
        return _ConnectionRecord(self, connect=False)

    def take_slot(self) -> bool:
        """Claim a free connection slot for a new connection, if there is one."""
        if self._overflow < self._max_overflow or self._max_overflow == -1:
            self._overflow += 1
            return True
        return False

    def close_record(self, record: ConnectionPoolEntry) -> None:
        """Close a record taken out of the idle queue and free its slot."""
        try:
            record.close()
        finally:
            self.release_slot()

    @property
    def idle_low_water(self) -> int:
        return self._idle_low

    def lower_idle_low_water(self, idle: int) -> None:
        if idle < self._idle_low:
            self._idle_low = idle

    def take_idle_low_water(self) -> int:
        """The fewest idle connections since the last call; starts again from now."""
        low, self._idle_low = self._idle_low, len(self._idle)
        return low

    def note_parked(self, record: ConnectionPoolEntry) -> None:
        dbapi_connection: Any = record.dbapi_connection
        if dbapi_connection is not None:
            record._ap_parked = (  # type: ignore[attr-defined]
                dbapi_connection,
                dbapi_connection.driver_connection,
                time.monotonic(),
            )

    def parked_at(self, record: ConnectionPoolEntry) -> float:
        """``time.monotonic()`` when the record was last given back."""
        parked = record.__dict__.get("_ap_parked")
        if parked is not None and parked[0] is record.dbapi_connection:
            return float(parked[2])
        born: float = record.starttime  # type: ignore[attr-defined]
        return time.monotonic() - (time.time() - born)

    @property
    def upkeep(self) -> Upkeep:
        return self._upkeep

    def _dec_overflow(self) -> Any:
        self.release_slot()
        return True

    # ---------------------------------------------------------- connect / close

    def _counting_creator(self, invoke: Any) -> Any:
        """Wrap SQLAlchemy's creator call to count and time every connect, and
        apply the session settings every connection gets."""

        def invoke_and_count(record: ConnectionPoolEntry) -> DBAPIConnection:
            state = self._state
            started = time.perf_counter()
            try:
                connection: DBAPIConnection = invoke(record)
                self._driver.connected(connection.driver_connection)
                if self._session_settings:
                    self._apply_session_settings(connection)
            except BaseException as exc:
                state.counters.connect_errors += 1
                for observer in state.observers:
                    observer.connected(time.perf_counter() - started, exc)
                raise
            state.counters.connects += 1
            if self._recycle > 0:
                # A lifetime of its own, so that connections opened together
                # are not all replaced at once (HikariCP, psycopg_pool).
                lifetime = self._recycle - self._recycle_jitter * lifetime_share()
                record._ap_expires = time.time() + lifetime  # type: ignore[attr-defined]
            if state.observers:
                seconds = time.perf_counter() - started
                for observer in state.observers:
                    observer.connected(seconds, None)
            return connection

        return invoke_and_count

    def _apply_session_settings(self, connection: Any) -> None:
        """``client_connection_check_interval`` where the server has it (PostgreSQL 14+)."""
        driver_connection = connection.driver_connection
        if self._driver.server_version(driver_connection) < _CHECK_INTERVAL_SINCE:
            return
        try:
            await_(self._driver.set_session(driver_connection, self._session_settings))
        except Exception:
            self._driver.abort(driver_connection)
            raise

    def _set_creator(self, creator: Any) -> None:
        _BASE_CREATOR.fset(self, creator)
        self._invoke_creator = self._counting_creator(self._invoke_creator)

    # Every path that (re)connects goes through _invoke_creator, which the
    # base class rebuilds whenever _creator is assigned: wrap it there.
    _creator = property(_BASE_CREATOR.fget, _set_creator, _BASE_CREATOR.fdel)

    def _close_connection(self, connection: DBAPIConnection, *, terminate: bool = False) -> None:
        driver_connection = getattr(connection, "driver_connection", None)
        if driver_connection is None:
            super()._close_connection(connection, terminate=terminate)
            return
        driver = self._driver
        loop = driver.loop_of(driver_connection)
        if loop is not None and loop.is_closed():
            driver.abandon(driver_connection)
            return
        if terminate and self._lent and loop is asyncio._get_running_loop():
            # SQLAlchemy invalidates a lent connection whose state is unclear
            # (its caller was cancelled mid-statement, command_timeout): the
            # server may still be running the statement, holding its locks.
            # Clean it in a task of our own instead of aborting it.
            for rec in self._lent:
                if rec.dbapi_connection is connection:
                    if driver.state(driver_connection) is not ConnectionState.CLOSED:
                        why = self._state.invalidated_by(connection)
                        reusable = invalidation_reason(why) in _UNCLEAR_STATE_REASONS
                        self._cleanup.adopt(rec, connection, reusable=reusable)
                        return
                    break
        # Never a round trip, even for a plain close (an idle or overflow
        # connection, dispose): the driver writes its Terminate message and
        # closes the socket at once, so no cancellation can interrupt a close
        # halfway (anyio re-cancels at every await of a give-back path).
        self.logger.debug("Terminating connection %r", connection)
        driver.abort(driver_connection)

    def dispose(self) -> None:
        """Close the idle connections (SQLAlchemy's ``Pool.dispose()``); the pool
        keeps pooling. ``engine.dispose()`` also replaces it (``recreate()``)."""
        closed = 0
        while self._idle:
            self._idle.popleft().close()
            closed += 1
        self._overflow -= closed  # their slots are free again
        self.logger.info("Pool disposed. %s", self.status())

    # ---------------------------------------------------------------- shutdown

    def reject_waiters(self) -> int:
        """Fail every queued checkout with ``PoolClosedError`` (shutdown); how many."""
        rejected = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(
                    PoolClosedError(f"pool {self.name!r} closed while this checkout waited")
                )
                rejected += 1
        return rejected

    def all_returned(self) -> asyncio.Event:
        """An event set once no connection is lent out or being cleaned (a
        drain waits on it).

        Only set by a slot coming free, which is what every give-back does
        while the pool is closed (``PoolState.closed``).
        """
        if self._returned is None:
            self._returned = asyncio.Event()
        if self.checkedout() <= 0:
            self._returned.set()
        else:
            self._returned.clear()  # a lifespan entered again: not drained yet
        return self._returned

    def terminate_lent(self, reason: BaseException, *, idle: bool = False) -> int:
        """End every connection still lent out (and the idle ones if ``idle``).

        A statement still running is cancelled on the server first (in a
        cleanup task, bounded by ``cleanup_timeout``; ``wait_cleaned()``
        awaits them). A holder's next database call fails; its give-back then
        frees the slot.
        """
        terminated = 0
        lent = self._lent
        for rec in [*lent, *(self._idle if idle else ())]:
            dbapi_connection = rec.dbapi_connection
            if dbapi_connection is not None:
                if rec in lent:
                    with contextlib.suppress(TypeError):  # not weakly referenceable
                        ended_by_shutdown[dbapi_connection.driver_connection] = (
                            f"pool {self.name!r} was shut down while this connection was "
                            f"still checked out; it was ended ({reason})"
                        )
                rec.invalidate(reason)
                terminated += 1
        return terminated

    async def wait_cleaned(self) -> None:
        """Until no cleanup is in flight (each is bounded by ``cleanup_timeout``)."""
        await self._cleanup.wait()

    def abort_cleanups(self) -> int:
        """Abort every connection being cleaned, without a round trip; how many."""
        return self._cleanup.abort_all()

    def drop_inherited(self) -> int:
        """In a forked child: let go of every connection, idle, lent or being
        cleaned, without any I/O.

        The parent still talks on these sockets, so the child must neither
        write to them nor shut them down nor touch the parent's event loop.
        """
        self._upkeep.forget_dead_loop()  # the parent's loop: never touched here
        dropped = 0
        connections = [rec.dbapi_connection for rec in [*self._idle, *self._lent]]
        for dbapi_connection in [*connections, *self._cleanup.connections()]:
            if dbapi_connection is not None:
                self._driver.drop_without_io(dbapi_connection.driver_connection)
                dropped += 1
        return dropped

    # ------------------------------------------------------------- event loops

    async def at_loop_end(self) -> None:
        """The owner loop is shutting down: its connections are of no use to
        another loop. Finish the cleanups (their statements stop on the server),
        then drop the idle connections while the loop can still close them."""
        await self._upkeep.halt()
        await self._cleanup.finish()
        # The driver's own tasks that the loop's cancel-all started (asyncpg
        # sends a cancelled query's CancelRequest from a task) get to finish,
        # bounded, instead of being destroyed pending when the loop closes.
        stragglers = self._driver.own_tasks(asyncio.all_tasks())
        if stragglers:
            await asyncio.wait(stragglers, timeout=self._state.config.cleanup_timeout)
        dropped = self.invalidate_idle(OwnerLoopClosed(f"pool {self.name!r}: owner loop closed"))
        if dropped:
            logger.debug(
                "pool %r: owner loop ending; closed %d idle connections", self.name, dropped
            )

    def forget_dead_loop(self) -> None:
        """The owner loop is closed: forget what belonged to it (see ``_loops``)."""
        self._cleanup.forget_dead_loop()
        self._upkeep.forget_dead_loop()
        self._waiters.clear()  # futures of the dead loop: their tasks are gone
        self._returned = None  # an asyncio.Event bound to the dead loop
        self._foreign_connections_possible = True


def _session_settings(config: PoolConfig) -> dict[str, str]:
    """Settings ``SET`` on every new connection (never behind a transaction pooler,
    where a session setting would land on whichever server connection)."""
    interval = config.client_connection_check_interval
    if interval is None or config.pooler is not None:
        return {}
    return {"client_connection_check_interval": f"{max(round(interval * 1000), 1)}ms"}


def _refill(rec: ConnectionPoolEntry) -> ConnectionPoolEntry:
    rec.get_connection()  # type: ignore[attr-defined]  # reconnects an empty record
    return rec


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_WaitTimedOut())
