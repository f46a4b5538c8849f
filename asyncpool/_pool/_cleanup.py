"""Give-back hygiene: only clean connections go back into the pool.

A connection whose state is unclear (its caller was cancelled or timed out
mid-statement, or it came back inside a transaction or with a statement
running) is put in order in a task of the pool's own, never in the caller's
task, so no cancellation can cut the work halfway and no caller waits for it:

1. **settle**: a statement still running is cancelled on the server
   (PostgreSQL's CancelRequest) and its acknowledgement awaited, so the
   server stops it and releases its locks;
2. **roll back** the transaction, SQLAlchemy's view of it and the server's;
3. **reuse** the connection if it is now idle and healthy, else close it.

The whole of it is bounded by ``cleanup_timeout``; past that (a black-holed
network) the connection is aborted without a round trip, and the server's
``client_connection_check_interval`` ends the orphan. Until a cleanup is
done, its record keeps its slot: the pool's bound holds on the server too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from sqlalchemy.util.concurrency import greenlet_spawn

from .._drivers import ConnectionState
from ._state import CleanupFailed

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

    from ._fair import FairAsyncPool

__all__ = ["Cleanup", "unclean_reason"]

logger = logging.getLogger("asyncpool.pool")

#: ``invalidations_by_reason`` labels of a connection given back unclean.
_GIVE_BACK_REASONS: Final = {
    ConnectionState.IN_TRANSACTION: "returned_in_transaction",
    ConnectionState.BUSY: "returned_mid_statement",
    ConnectionState.CANCELLING: "returned_cancelling",
    ConnectionState.BROKEN: "returned_broken",
}

_GIVE_BACK_WHY: Final = {
    ConnectionState.IN_TRANSACTION: (
        "inside a transaction SQLAlchemy did not track (a BEGIN sent as text or on the "
        "driver connection, or left open by a hook); rolling it back before reuse"
    ),
    ConnectionState.BUSY: (
        "with a statement still running; cancelling it on the server and closing the connection"
    ),
    ConnectionState.CANCELLING: (
        "while its statement was being cancelled; waiting for the server before reuse"
    ),
    ConnectionState.BROKEN: (
        "with its protocol in an error state (the server ended it?); closing the connection"
    ),
}


#: States no cleanup can repair: the socket is closed, or the protocol is lost.
_BEYOND_REPAIR: Final = frozenset({ConnectionState.CLOSED, ConnectionState.BROKEN})


def unclean_reason(state: ConnectionState) -> str:
    return _GIVE_BACK_REASONS.get(state, state.value)


@dataclass(slots=True, eq=False)
class _Job:
    record: ConnectionPoolEntry
    dbapi_connection: Any
    #: SQLAlchemy invalidated the record: the connection is ours alone now and
    #: goes back into the record only if it comes out clean.
    detached: bool
    #: The record is back from its holder (a detached one may come back later).
    returned: bool
    #: May go back into the pool if it comes out clean (not when the server
    #: or the application condemned it: then it is only settled and closed).
    reusable: bool = True
    task: asyncio.Task[bool] | None = None


class Cleanup:
    """The pool's cleanups in flight, one per record at most."""

    def __init__(self, pool: FairAsyncPool) -> None:
        self._pool = pool
        self._jobs: dict[ConnectionPoolEntry, _Job] = {}
        self._idle: asyncio.Event | None = None
        self._watcher: AsyncGenerator[None, None] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, record: object) -> bool:
        return record in self._jobs

    def connections(self) -> list[Any]:
        """The DBAPI connections being cleaned (a forked child drops them)."""
        return [job.dbapi_connection for job in self._jobs.values()]

    # ------------------------------------------------------------------ start

    def give_back(self, record: ConnectionPoolEntry, state: ConnectionState) -> None:
        """``record`` came back unclean: put it in order before anyone gets it."""
        pool = self._pool
        reason = unclean_reason(state)
        pool.state.count_invalidation(reason)
        logger.warning(
            "pool %r: a connection was given back %s", pool.name, _GIVE_BACK_WHY.get(state, reason)
        )
        self._start(_Job(record, record.dbapi_connection, detached=False, returned=True))

    def adopt(self, record: ConnectionPoolEntry, dbapi_connection: Any, *, reusable: bool) -> None:
        """SQLAlchemy invalidated a lent ``record``: take its connection over
        instead of aborting it. ``reusable`` when only its state was unclear
        (its caller was cancelled or timed out), not the connection itself."""
        job = _Job(record, dbapi_connection, detached=True, returned=False, reusable=reusable)
        self._start(job)

    def note_returned(self, record: ConnectionPoolEntry) -> bool:
        """A record came back: True if a cleanup holds it (its slot stays taken)."""
        job = self._jobs.get(record)
        if job is None:
            return False
        job.returned = True
        return True

    def _start(self, job: _Job) -> None:
        pool = self._pool
        loop = pool.owner_loop
        assert loop is not None
        pool.state.counters.cleanups += 1
        self._jobs[job.record] = job
        if self._idle is not None:
            self._idle.clear()
        job.task = loop.create_task(self._clean(job), name=f"asyncpool cleanup {pool.name}")
        job.task.add_done_callback(lambda task: self._finish(job, task))

    # ------------------------------------------------------------------- work

    async def _clean(self, job: _Job) -> bool:
        """Put the connection in order; True if it may be reused. Never raises
        (but a cancellation, which aborts the connection first)."""
        pool = self._pool
        driver = pool.driver
        conn = job.dbapi_connection.driver_connection
        started = time.monotonic()
        try:
            async with asyncio.timeout(pool.state.config.cleanup_timeout):
                if driver.state(conn) in _BEYOND_REPAIR:
                    driver.abort(conn)  # releases the descriptor
                    return False
                ours = await driver.settle(conn)
                if not (ours and job.reusable and pool.accepts_returns()):
                    await driver.close(conn)
                    return False
                try:
                    # SQLAlchemy's own view of the transaction first, then the server's.
                    await greenlet_spawn(job.dbapi_connection.rollback)
                except Exception:
                    logger.debug("pool %r: cleanup rollback failed", pool.name, exc_info=True)
                await driver.rollback(conn)
                if driver.state(conn) is ConnectionState.IDLE:
                    return True
                await driver.close(conn)
                return False
        except TimeoutError:
            pool.state.counters.cleanup_timeouts += 1
            logger.warning(
                "pool %r: cleaning a connection took over cleanup_timeout=%g s; aborted it "
                "(the server ends its statement within client_connection_check_interval)",
                pool.name,
                pool.state.config.cleanup_timeout,
            )
        except asyncio.CancelledError:
            driver.abort(conn)  # the loop is shutting down: no round trip
            raise
        except Exception as exc:
            logger.info(
                "pool %r: cleaning a connection failed after %.3f s (%s: %s); closed it",
                pool.name,
                time.monotonic() - started,
                type(exc).__name__,
                exc,
            )
        driver.abort(conn)
        return False

    def _finish(self, job: _Job, task: asyncio.Task[bool]) -> None:
        """Runs as the task's done callback: reuse or discard, then free the slot."""
        pool = self._pool
        record = job.record
        if self._jobs.get(record) is job:
            del self._jobs[record]
        clean = not task.cancelled() and task.exception() is None and task.result()
        parked = False
        try:
            if (
                clean
                and job.returned
                and pool.accepts_returns()
                and (not job.detached or record.dbapi_connection is None)
            ):
                pool.state.counters.cleanups_reused += 1
                if job.detached:
                    _put_back(record, job.dbapi_connection)
            elif not job.detached:
                # Discarded: SQLAlchemy's record lets go of it (events); its
                # invalidation was counted when it came back unclean.
                failed = CleanupFailed(f"pool {pool.name!r}: cleanup failed", counted=True)
                record.invalidate(failed)
            elif clean:
                # Nobody to give it to (or its record holds a newer connection).
                pool.driver.abort(job.dbapi_connection.driver_connection)
            if job.returned:
                parked = True
                pool.park(record)  # never raises; frees the slot if it closes
        except Exception:
            # A failing user listener must not cost the pool its slot, nor free it twice.
            logger.exception("pool %r: finishing a cleanup failed", pool.name)
            if job.returned and not parked:
                pool.release_slot()
        finally:
            if not self._jobs and self._idle is not None:
                self._idle.set()

    # ------------------------------------------------------------- shutdown

    def watch_loop(self) -> None:
        """Call ``pool.at_loop_end()`` when the owner loop shuts down
        (``asyncio.run()``, ``uvloop.run()``): an async generator is what such a
        loop closes last (``shutdown_asyncgens()``), after it cancelled its
        tasks, so the cleanups those cancellations started are there to finish."""
        watcher = _watch_loop_end(self)
        self._watcher = watcher  # the loop holds it weakly
        try:
            watcher.asend(None).send(None)  # to its first yield: now the loop knows it
        except StopIteration:
            pass

    async def finish(self) -> None:
        """Let the cleanups in flight finish (bounded), then abort what is left."""
        if self._jobs:
            try:
                async with asyncio.timeout(self._pool.state.config.cleanup_timeout):
                    await self.wait()
            except TimeoutError:
                pass
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        self.abort_all()
        await asyncio.gather(*tasks, return_exceptions=True)  # let them end here

    async def wait(self) -> None:
        """Until no cleanup is in flight (each is bounded by ``cleanup_timeout``)."""
        if not self._jobs:
            return
        if self._idle is None:
            self._idle = asyncio.Event()
        self._idle.clear()
        await self._idle.wait()

    def abort_all(self) -> int:
        """Abort every connection being cleaned, no round trip; how many."""
        driver = self._pool.driver
        jobs = list(self._jobs.values())
        for job in jobs:
            driver.abort(job.dbapi_connection.driver_connection)
            if job.task is not None:
                job.task.cancel()
        return len(jobs)

    def forget_dead_loop(self) -> None:
        """The owner loop closed with cleanups pending: drop their connections
        without that loop and give their records back."""
        driver = self._pool.driver
        jobs, self._jobs = list(self._jobs.values()), {}
        self._idle = None
        self._watcher = None
        for job in jobs:
            driver.abandon(job.dbapi_connection.driver_connection)
            if not job.detached:
                _put_back(job.record, None)
            if job.returned:
                self._pool.park(job.record)


async def _watch_loop_end(cleanup: Cleanup) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await cleanup._pool.at_loop_end()


def _put_back(record: ConnectionPoolEntry, dbapi_connection: Any) -> None:
    """Set the connection a record holds (SQLAlchemy's record keeps it in a plain attribute)."""
    cast(Any, record).dbapi_connection = dbapi_connection
