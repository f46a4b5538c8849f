"""The fair asyncio pool.

This is the one module that touches SQLAlchemy's private pool API
(``_do_get``, ``_do_return_conn``, ``_close_connection``, ``_overflow``).
It replaces the checkout and checkin halves of ``AsyncAdaptedQueuePool``:

* **Fair hand-off.** A returned connection goes straight to the oldest
  waiter; a newcomer takes an idle connection only when nobody waits. So no
  caller can overtake a waiter and nobody starves (SQLAlchemy's queue lets a
  ``get_nowait()`` barge past woken waiters).
* **Bounded pre-ping.** ``SELECT 1`` on the simple protocol (no transaction, no
  prepared statement), bounded by ``pre_ping_timeout``, skipped for
  connections returned less than ``pre_ping_skip_window`` ago. A failed ping
  replaces the connection; the caller never sees it.
* **Bounded waiting.** ``max_waiting`` refuses at once instead of queueing.
* **Loop ownership.** The pool belongs to the loop that first used it; a
  closed owner is let go of without touching it, a live one is protected.
* **Invalidation without a round trip.** A connection whose state is unknown
  is aborted (socket closed), never awaited, so cancellation cannot strand it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import os
import socket
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import greenlet
from sqlalchemy import event
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, Pool
from sqlalchemy.util import queue as sqla_queue

from .config import PoolConfig
from .errors import PoolClosedError, PoolOverloadedError, PoolTimeoutError, WrongEventLoopError

try:  # SQLAlchemy 2.1
    from sqlalchemy.util.concurrency import await_
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util.concurrency import await_only as await_
from sqlalchemy.util.concurrency import greenlet_spawn

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection

__all__ = ["FairAsyncPool", "PoolCounters", "PoolObserver", "PoolState"]

logger = logging.getLogger("asyncpool.pool")

_names: Iterator[int] = itertools.count(1)


def next_pool_name() -> str:
    """``pool-N``: the name of a pool whose config gives none."""
    return f"pool-{next(_names)}"


class PrePingFailed(Exception):
    """Why a connection was replaced at checkout (the driver's error is chained)."""


class OwnerLoopClosed(Exception):
    """The connection belonged to an event loop that has been closed."""


class _WaitTimedOut(Exception):
    """Set on a waiter's future when ``pool_timeout`` expires."""


#: SQLAlchemy's own ``Pool._creator`` property, re-used by the override below.
_BASE_CREATOR: Final[Any] = Pool.__dict__["_creator"]

#: Handed to a waiter instead of a record: "a connection slot is yours, open one".
_SLOT: Final = object()

#: Connects whose caller gave up: held here until they finish (see _open_record).
_connect_tasks: Final[set[asyncio.Task[Any]]] = set()


class PoolObserver(Protocol):
    """What telemetry hears from the pool. Every method must be cheap and never raise."""

    def checked_out(self, wait: float, waited: bool, ping_error: BaseException | None) -> None: ...

    def checkout_failed(self, wait: float, error: BaseException) -> None: ...

    def checked_in(self, use: float) -> None: ...

    def connected(self, seconds: float, error: BaseException | None) -> None: ...

    def invalidated(self, reason: str) -> None: ...


@dataclass(slots=True)
class PoolCounters:
    """Monotonic counters; plain ints bumped inline, read by ``statistics()``."""

    checkouts: int = 0
    pre_pings: int = 0
    waits: int = 0
    wait_seconds_total: float = 0.0
    wait_seconds_max: float = 0.0
    timeouts: int = 0
    rejected: int = 0
    connects: int = 0
    connect_errors: int = 0
    pre_ping_failures: int = 0
    invalidations: int = 0
    recycles: int = 0
    leaks_detected: int = 0
    invalidations_by_reason: collections.Counter[str] = field(default_factory=collections.Counter)


class PoolState:
    """What one engine's pools share across ``engine.dispose()`` (which recreates the pool)."""

    __slots__ = ("closed", "config", "counters", "name", "observers")

    def __init__(self, config: PoolConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.counters = PoolCounters()
        self.observers: tuple[PoolObserver, ...] = ()
        self.closed = False

    def add_observer(self, observer: PoolObserver) -> None:
        self.observers = (*self.observers, observer)

    def remove_observer(self, observer: PoolObserver) -> None:
        self.observers = tuple(o for o in self.observers if o is not observer)

    def on_invalidate(
        self, dbapi_connection: Any, record: Any, exception: BaseException | None
    ) -> None:
        """``PoolEvents.invalidate`` listener: every invalidation, whoever caused it."""
        reason = invalidation_reason(exception)
        self.counters.invalidations += 1
        self.counters.invalidations_by_reason[reason] += 1
        for observer in self.observers:
            observer.invalidated(reason)


def invalidation_reason(exception: BaseException | None) -> str:
    """A short, stable label for why a connection was invalidated."""
    if exception is None:
        return "explicit"
    if isinstance(exception, PrePingFailed):
        return "pre_ping"
    if isinstance(exception, OwnerLoopClosed):
        return "loop_closed"
    if isinstance(exception, asyncio.CancelledError):
        return "cancelled"
    from ._classify import classify  # local: keeps the hot import graph small

    return classify(exception)


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
    """``AsyncAdaptedQueuePool`` with FIFO hand-off, bounded pre-ping and waiting."""

    _queue_class = _IdleQueue
    _pool: _IdleQueue

    def __init__(
        self,
        creator: Any,
        asyncpool_state: PoolState | None = None,
        **kw: Any,
    ) -> None:
        first = kw.get("_dispatch") is None
        super().__init__(creator, **kw)
        if asyncpool_state is None:
            config = PoolConfig(
                pool_size=self._pool.maxsize,
                max_overflow=max(self._max_overflow, 0),
                pool_timeout=self._timeout,
            )
            asyncpool_state = PoolState(config, self._orig_logging_name or next_pool_name())
        self._state = asyncpool_state
        self._counters = asyncpool_state.counters
        config = asyncpool_state.config
        self._ping_enabled = config.pre_ping
        self._ping_timeout = config.pre_ping_timeout
        self._ping_skip = config.pre_ping_skip_window
        self._max_waiting = config.max_waiting
        self._leak_threshold = config.leak_threshold
        self._idle = self._pool.items
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._foreign_connections_possible = False
        self._checkout_started: dict[ConnectionPoolEntry, float] = {}
        self._leak_timers: dict[ConnectionPoolEntry, asyncio.TimerHandle] = {}
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

    def __repr__(self) -> str:
        return (
            f"<FairAsyncPool {self.name!r} size={self._pool.maxsize} "
            f"overflow={self._max_overflow} checked_out={self.checkedout()} "
            f"idle={len(self._idle)} waiting={len(self._waiters)}>"
        )

    def recreate(self) -> FairAsyncPool:
        self.logger.info("Pool recreating")
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
            self._adopt_running_loop()
        if self._state.closed:
            raise PoolClosedError(f"pool {self.name!r} is closed; no new checkouts are accepted")
        started = time.perf_counter()
        waited = False
        if self._idle and not self._waiters:
            rec = self._idle.pop() if self._pool.use_lifo else self._idle.popleft()
        elif not self._waiters and (
            self._overflow < self._max_overflow or self._max_overflow == -1  # -1: no limit
        ):
            self._overflow += 1
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
            # (connection, its driver, when) as it was parked; a connection
            # opened since (None, or another) is fresh and needs no ping.
            parked = rec.__dict__.get("_ap_parked")
            if parked is not None and parked[0] is rec.dbapi_connection:
                if time.monotonic() - parked[2] >= self._ping_skip or parked[1].is_closed():
                    ping_error = self._ping(rec, parked[1])
        if rec.dbapi_connection is None:  # invalidated earlier, or by the ping
            rec = self._open_record(rec)
        self._counters.checkouts += 1
        self._lent.add(rec)
        observers = self._state.observers
        if observers:
            now = time.perf_counter()
            self._checkout_started[rec] = now  # for the use time at checkin
            for observer in observers:
                observer.checked_out(now - started, waited, ping_error)
        if self._leak_threshold is not None:
            self._start_leak_timer(rec)
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
                self._release_slot()
            else:
                rec._checkin_failed(error, _fairy_was_created=False)  # type: ignore[attr-defined]
        except Exception:
            # Run by the event loop as a callback: a failing user listener
            # (checkin, close, invalidate) must not cost the pool its slot.
            logger.exception("pool %r: settling a finished connect failed", self.name)
            if rec is None:
                self._release_slot()

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
                self._release_slot()
            else:
                self._do_return_conn(got)
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
        return cls(
            message,
            pool_name=self.name,
            pool_size=size,
            max_overflow=overflow,
            checked_out=out,
            waiting=waiting,
            waited=waited,
        )

    # ----------------------------------------------------------------- pre-ping

    def _ping(self, rec: ConnectionPoolEntry, driver: Any) -> BaseException | None:
        """Ping a reused connection (``driver`` is its asyncpg connection);
        on failure replace it. Returns the failure, if any.

        ``_do_get`` calls this for a connection parked at least
        ``pre_ping_skip_window`` ago, or one whose socket the loop already
        saw close.
        """
        self._counters.pre_pings += 1
        try:
            if driver.is_closed():
                raise ConnectionError("connection is closed")
            # Simple query protocol: no prepared statement, no transaction.
            # (asyncpg's execute() chokes on the empty query ";".)
            await_(driver.execute("SELECT 1", timeout=self._ping_timeout))
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
        if self._checkout_started:
            started = self._checkout_started.pop(record, None)
            if started is not None:
                use = time.perf_counter() - started
                for observer in self._state.observers:
                    observer.checked_in(use)
        if self._leak_timers:
            self._clear_leak_timer(record)
        if self._foreign_connections_possible:
            self._drop_if_foreign(record)
        if self._ping_enabled:
            dbapi_connection: Any = record.dbapi_connection
            record._ap_parked = (  # type: ignore[attr-defined]
                None
                if dbapi_connection is None
                else (dbapi_connection, dbapi_connection.driver_connection, time.monotonic())
            )
        if self._state.closed:
            self.reject_waiters()  # shutting down: nobody is served any more
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(record)
                return
        if len(self._idle) < self._pool.maxsize and not (self._state.closed or self._disposed):
            self._idle.append(record)
            return
        try:
            record.close()
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        """A connection slot came free: give it to the oldest waiter, else shrink."""
        if self._state.closed:
            self.reject_waiters()
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(_SLOT)
                return
        self._overflow -= 1
        if self._returned is not None and self.checkedout() <= 0:
            self._returned.set()

    def _dec_overflow(self) -> Any:
        self._release_slot()
        return True

    # ---------------------------------------------------------- connect / close

    def _counting_creator(self, invoke: Any) -> Any:
        """Wrap SQLAlchemy's creator call to count and time every connect."""

        def invoke_and_count(record: ConnectionPoolEntry) -> DBAPIConnection:
            state = self._state
            started = time.perf_counter()
            try:
                connection: DBAPIConnection = invoke(record)
            except BaseException as exc:
                state.counters.connect_errors += 1
                for observer in state.observers:
                    observer.connected(time.perf_counter() - started, exc)
                raise
            state.counters.connects += 1
            if state.observers:
                seconds = time.perf_counter() - started
                for observer in state.observers:
                    observer.connected(seconds, None)
            return connection

        return invoke_and_count

    def _set_creator(self, creator: Any) -> None:
        _BASE_CREATOR.fset(self, creator)
        self._invoke_creator = self._counting_creator(self._invoke_creator)

    # Every path that (re)connects goes through _invoke_creator, which the
    # base class rebuilds whenever _creator is assigned: wrap it there.
    _creator = property(_BASE_CREATOR.fget, _set_creator, _BASE_CREATOR.fdel)

    def _close_connection(self, connection: DBAPIConnection, *, terminate: bool = False) -> None:
        driver = getattr(connection, "driver_connection", None)
        loop = getattr(driver, "_loop", None)
        if loop is not None and loop.is_closed():
            _abandon(driver)
            return
        if driver is not None and hasattr(driver, "terminate"):
            # Never a round trip, even for a plain close (an overflow
            # connection given back, dispose): asyncpg's terminate() writes
            # the Terminate message and closes the socket at once, so the
            # backend ends cleanly and no cancellation can interrupt a close
            # halfway (anyio re-cancels at every await of a give-back path).
            self.logger.debug("Terminating connection %r", connection)
            driver.terminate()
            return
        super()._close_connection(connection, terminate=terminate)

    def dispose(self) -> None:
        self._disposed = True
        while self._idle:
            self._idle.popleft().close()
        self._overflow = 0 - self.size()
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
        """An event set once no connection is lent out (a drain waits on it).

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
        """Abort every connection still lent out (and the idle ones if ``idle``).

        No round trip (drain stragglers, an interrupted dispose). A holder's
        next database call fails; its give-back then frees the slot.
        """
        terminated = 0
        for rec in [*self._lent, *(self._idle if idle else ())]:
            if rec.dbapi_connection is not None:
                rec.invalidate(reason)
                terminated += 1
        return terminated

    def drop_inherited(self) -> int:
        """In a forked child: let go of every connection, idle or lent, without any I/O.

        The parent still talks on these sockets, so the child must neither
        write to them nor shut them down nor touch the parent's event loop.
        """
        dropped = 0
        for rec in [*self._idle, *self._lent]:
            dbapi_connection = rec.dbapi_connection
            if dbapi_connection is not None:
                _drop_without_io(dbapi_connection.driver_connection)
                dropped += 1
        return dropped

    # ------------------------------------------------------------- event loops

    def _adopt_running_loop(self) -> None:
        running = asyncio.get_running_loop()
        owner = self._loop
        if owner is not None and not owner.is_closed():
            raise WrongEventLoopError(
                f"pool {self.name!r} belongs to another event loop, which is still open; "
                "an engine cannot be shared between event loops: create one engine per loop, "
                "or `await engine.dispose()` in the owning loop and close it first"
            )
        if owner is not None:
            # The owner loop is gone (asyncio.run() per job, a test's loop):
            # its connections are unusable here. Drop the idle ones without
            # awaiting anything, which also frees their server backends; the
            # empty records keep their slots and reconnect on checkout.
            dropped = 0
            for rec in self._idle:
                if rec.dbapi_connection is not None:
                    rec.invalidate(OwnerLoopClosed(f"pool {self.name!r}: owner loop closed"))
                    dropped += 1
            self._waiters.clear()  # futures of the dead loop: their tasks are gone
            self._returned = None  # an asyncio.Event bound to the dead loop
            self._foreign_connections_possible = True
            logger.info(
                "pool %r: owner event loop closed; dropped %d idle connections", self.name, dropped
            )
        self._loop = running

    def _drop_if_foreign(self, record: ConnectionPoolEntry) -> None:
        """A connection checked out under a dead loop came back: drop it."""
        dbapi_connection = record.dbapi_connection
        if dbapi_connection is not None:
            driver = dbapi_connection.driver_connection
            if getattr(driver, "_loop", self._loop) is not self._loop:
                record.invalidate(OwnerLoopClosed(f"pool {self.name!r}: owner loop closed"))

    # ------------------------------------------------------------ leak + timing

    def _start_leak_timer(self, rec: ConnectionPoolEntry) -> None:
        if self._loop is None or self._leak_threshold is None:
            return
        stack = _caller_stack()
        self._leak_timers[rec] = self._loop.call_later(
            self._leak_threshold, self._report_leak, rec, stack, time.perf_counter()
        )

    def _report_leak(self, rec: ConnectionPoolEntry, stack: str, since: float) -> None:
        self._counters.leaks_detected += 1
        rec._ap_leak_reported = since  # type: ignore[attr-defined]
        logger.warning(
            "pool %r: connection leak suspected: checked out %.1f s ago and not returned "
            "(leak_threshold=%g s). It was checked out at:\n%s",
            self.name,
            time.perf_counter() - since,
            self._leak_threshold,
            stack,
        )

    def _clear_leak_timer(self, rec: ConnectionPoolEntry) -> None:
        timer = self._leak_timers.pop(rec, None)
        if timer is not None:
            timer.cancel()
        since = rec.__dict__.pop("_ap_leak_reported", None)
        if since is not None:
            logger.warning(
                "pool %r: the connection reported as leaked was returned after %.1f s; "
                "leak warning cleared",
                self.name,
                time.perf_counter() - since,
            )

    def _notify_failed(self, waited: float, error: BaseException) -> None:
        for observer in self._state.observers:
            observer.checkout_failed(waited, error)


def _refill(rec: ConnectionPoolEntry) -> ConnectionPoolEntry:
    cast(Any, rec).get_connection()  # reconnects an empty record
    return rec


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_WaitTimedOut())


def _abandon(driver: Any) -> None:
    """Drop a connection whose event loop is closed, without that loop.

    Shutting the socket down makes the server end the backend at once;
    closing the transport by hand releases the file descriptor, since the
    loop that would normally do it can no longer run callbacks.
    """
    transport = getattr(driver, "_transport", None)
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    try:
        driver.terminate()
    except RuntimeError:
        pass  # "Event loop is closed": expected, the abort flag is set first
    if transport is not None:
        try:
            transport._call_connection_lost(None)
        except Exception:
            logger.debug("closing a dead loop's transport failed", exc_info=True)


def _drop_without_io(driver: Any) -> None:
    """Make an inherited asyncpg connection inert in a forked child.

    Marked aborted, asyncpg's ``terminate()`` and ``__del__`` leave it alone;
    the child's copy of the socket is pointed at /dev/null (not closed, so a
    later close by its transport cannot hit a reused descriptor), which lets
    the server see the connection end once the parent closes its own copy.
    No shutdown(): that would cut the parent's connection too.
    """
    driver._aborted = True
    transport = getattr(driver, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _caller_stack() -> str:
    """The stack that checked the connection out, across SQLAlchemy's greenlet bridge."""
    frames = list(traceback.extract_stack())
    parent = greenlet.getcurrent().parent
    if parent is not None and parent.gr_frame is not None:
        frames = list(traceback.extract_stack(parent.gr_frame)) + frames
    # The event loop's own frames say nothing about who leaked: drop them,
    # so the frames kept are the caller's.
    noise = ("/sqlalchemy/", "/asyncpool/_pool", "/asyncio/")
    keep = [f for f in frames if not any(part in f.filename for part in noise)]
    return "".join(traceback.format_list(keep[-12:])).rstrip()
