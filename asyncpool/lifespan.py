"""pool_lifespan(): pools that are warm before the first request and gone after the last.

An ``@asynccontextmanager`` with no framework import, for any ASGI server,
worker or script::

    async with asyncpool.pool_lifespan(engine):
        ...  # serve

**Start.** Opens ``min_idle`` connections per engine (``PoolConfig.min_idle``,
default ``pool_size``; HikariCP's ``minimumIdle``) before it yields. A database
that cannot be reached within ``warm_timeout`` raises
``DatabaseUnavailableError`` (host, port, database, the driver's reason): an
app must not start half-alive. Errors that retrying cannot fix (a wrong
password, a missing database) fail at once; refused or timed-out connections
are retried until ``warm_timeout``, so a database that is still starting up is
waited for.

**Stop.** New checkouts fail with ``PoolClosedError``; connections still lent
out get ``drain_timeout`` seconds to come back (each is closed as it returns);
stragglers are then terminated (no round trip); finally every engine is
disposed on the loop that owns it. Nothing is left for the garbage collector,
so nothing is printed at exit.

**Nesting.** Lifespans of one engine nest by counting: an inner one (a test
fixture inside an app's lifespan, a sub-application) neither warms the pool
again nor closes it; only the outermost exit drains and disposes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from ._classify import sqlstate_of
from ._pool import FairAsyncPool, PoolState
from ._url import redact_url, scrub
from ._validate import ENGINES_EXPECTED, check_bool, check_int, check_seconds
from .budget import BudgetMode, check_budget, check_budget_mode
from .engine import pool_of
from .errors import AsyncPoolError, ConfigurationError, DatabaseUnavailableError

__all__ = ["check_lifespan_arguments", "engines_of", "pool_lifespan", "pooled_engines"]

logger = logging.getLogger("asyncpool.lifespan")

#: Seconds to reach the database at start-up before giving up.
DEFAULT_WARM_TIMEOUT: Final = 10.0
#: Seconds lent-out connections get to come back at shutdown.
DEFAULT_DRAIN_TIMEOUT: Final = 5.0

#: SQLSTATE classes that no retry can fix: authorization (28: wrong password,
#: no pg_hba entry), invalid catalog (3D: no such database), invalid
#: parameter or configuration (22, 42, F0).
_PERMANENT_SQLSTATE_CLASSES: Final = frozenset({"28", "3D", "22", "42", "F0"})

#: Back-off between start-up connection attempts (seconds, doubled each time).
_RETRY_FIRST: Final = 0.1
_RETRY_MAX: Final = 1.0


#: Lifespans open per engine, keyed by its ``PoolState`` (which outlives the
#: pool objects that ``engine.dispose()`` replaces). A plain dict, since the
#: state takes no weak references: an entry lives only while a lifespan is open.
_open_lifespans: dict[PoolState, int] = {}


class DrainTimedOut(Exception):
    """Why a straggler was terminated: it outlived the drain at shutdown
    (``drain_timeout``, or a shutdown that was cancelled)."""


def engines_of(*items: Any) -> tuple[AsyncEngine, ...]:
    """Flatten engines and engine groups (anything with an ``engines`` iterable).

    Duplicates are dropped, first occurrence kept, so an engine listed twice
    (alone and in a group) is warmed and disposed once. Anything else is a
    ``ConfigurationError`` naming ``engines``.
    """
    found: dict[int, AsyncEngine] = {}
    for item in items:
        if isinstance(item, AsyncEngine):
            found.setdefault(id(item), item)
            continue
        members = getattr(item, "engines", None)
        if members is None or isinstance(members, str | bytes):
            raise ConfigurationError("engines", type(item).__name__, ENGINES_EXPECTED)
        if isinstance(members, dict):
            members = members.values()
        for engine in engines_of(*members):
            found.setdefault(id(engine), engine)
    return tuple(found.values())


def check_lifespan_arguments(
    *,
    warm: object,
    warm_timeout: object,
    drain_timeout: object,
    budget: object = None,
    processes: object = None,
) -> None:
    """``pool_lifespan``'s options, each a ``ConfigurationError`` naming it when wrong."""
    check_bool("warm", warm)
    check_seconds("warm_timeout", warm_timeout, allow_zero=False)
    check_seconds("drain_timeout", drain_timeout, allow_zero=True)
    check_budget_mode(budget)
    if processes is not None:
        check_int("processes", processes, low=1)


def pooled_engines(*engines: Any) -> tuple[tuple[AsyncEngine, ...], tuple[AsyncEngine, ...]]:
    """Every engine of ``engines``, and those on asyncpool's pool (the rest are NullPool).

    An engine on any other pool is a ``ConfigurationError`` naming ``engines``.
    """
    everything = engines_of(*engines)
    flat = tuple(e for e in everything if not isinstance(e.sync_engine.pool, NullPool))
    for engine in flat:
        if not isinstance(engine.sync_engine.pool, FairAsyncPool):
            raise ConfigurationError(
                "engines",
                redact_url(engine.url),
                "engines made by asyncpool.create_pooled_engine or create_analytics_engine",
            )
    return everything, flat


def pool_lifespan(
    *engines: Any,
    warm: bool = True,
    warm_timeout: float = DEFAULT_WARM_TIMEOUT,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    budget: BudgetMode | None = None,
    processes: int | None = None,
) -> contextlib.AbstractAsyncContextManager[tuple[AsyncEngine, ...]]:
    """Warm the pools of ``engines`` on entry; drain and dispose them on exit.

    ``engines`` are engines from ``create_pooled_engine`` or objects with an
    ``engines`` attribute (an ``EngineGroup``); yields the flat tuple of
    engines. ``warm=False`` skips opening connections at start.

    ``budget="warn"`` or ``"enforce"`` first checks that ``processes`` (default
    ``ASYNCPOOL_PROCESSES`` / ``WEB_CONCURRENCY`` / 1) x the engines' pools fit
    the server's ``max_connections`` (``asyncpool.budget.check_budget``);
    ``"enforce"`` refuses to start with ``BudgetExceededError``. Unpooled
    engines (``create_analytics_engine``) are not warmed, only disposed.

    Every argument is checked here, when called: a bad one is a
    ``ConfigurationError`` naming it, before any pool is touched.
    """
    check_lifespan_arguments(
        warm=warm,
        warm_timeout=warm_timeout,
        drain_timeout=drain_timeout,
        budget=budget,
        processes=processes,
    )
    everything, flat = pooled_engines(*engines)
    return _lifespan(
        engines,
        everything,
        flat,
        warm=warm,
        warm_timeout=warm_timeout,
        drain_timeout=drain_timeout,
        budget=budget,
        processes=processes,
    )


@contextlib.asynccontextmanager
async def _lifespan(
    engines: tuple[Any, ...],
    everything: tuple[AsyncEngine, ...],
    flat: tuple[AsyncEngine, ...],
    *,
    warm: bool,
    warm_timeout: float,
    drain_timeout: float,
    budget: BudgetMode | None,
    processes: int | None,
) -> AsyncIterator[tuple[AsyncEngine, ...]]:
    opened = _enter(flat)
    try:
        await check_budget(engines, processes, budget)  # groups keep their roles
        if warm:
            await _warm_all(opened, warm_timeout)  # an outer lifespan warmed the others
    except BaseException:
        await _shutdown(_leave(flat), drain_timeout=0.0)
        raise
    try:
        yield everything
    finally:
        await _shutdown(_leave(flat), drain_timeout=drain_timeout)
        for engine in everything:
            if engine not in flat:
                await engine.dispose()


def _enter(engines: tuple[AsyncEngine, ...]) -> tuple[AsyncEngine, ...]:
    """Count a lifespan in for each engine; those it opens (no other lifespan had them)."""
    opened = []
    for engine in engines:
        state = pool_of(engine).state
        count = _open_lifespans.get(state, 0)
        if count == 0:
            state.closed = False  # a lifespan entered again (tests, reload) reopens
            opened.append(engine)
        _open_lifespans[state] = count + 1
    return tuple(opened)


def _leave(engines: tuple[AsyncEngine, ...]) -> tuple[AsyncEngine, ...]:
    """Count a lifespan out for each engine; those whose last lifespan this was."""
    last = []
    for engine in engines:
        state = pool_of(engine).state
        count = _open_lifespans.pop(state, 1) - 1
        if count > 0:
            _open_lifespans[state] = count
        else:
            last.append(engine)
    return tuple(last)


# --------------------------------------------------------------------- start


async def _warm_all(engines: tuple[AsyncEngine, ...], warm_timeout: float) -> None:
    deadline = time.monotonic() + warm_timeout
    try:
        async with asyncio.TaskGroup() as group:
            for engine in engines:
                group.create_task(_warm(engine, deadline, warm_timeout))
    except BaseExceptionGroup as failed:
        # Report the first engine's failure as itself, not wrapped in a group.
        first = failed.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from first.__cause__


async def _warm(engine: AsyncEngine, deadline: float, warm_timeout: float) -> None:
    """Check out ``min_idle`` connections at once, then give them all back."""
    pool = pool_of(engine)
    wanted = pool.state.config.effective_min_idle
    if wanted == 0:
        return
    with pool.upkeep.warming():
        await _warm_up(engine, wanted, deadline, warm_timeout)
    logger.info("pool %r: warm, %d connections open", pool.name, wanted)


async def _warm_up(engine: AsyncEngine, wanted: int, deadline: float, warm_timeout: float) -> None:
    held: list[AsyncConnection] = []
    tasks: list[asyncio.Task[AsyncConnection]] = []
    try:
        # One first, alone: it runs the dialect's first-connect initialisation.
        held.append(await _connect(engine, deadline, warm_timeout))
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_connect(engine, deadline, warm_timeout))
                for _ in range(wanted - 1)
            ]
    except BaseExceptionGroup as failed:
        first = failed.exceptions[0]
        raise first from first.__cause__
    finally:
        held.extend(t.result() for t in tasks if _succeeded(t))
        if held:
            # Shielded: a cancellation (anyio re-cancels at every await) must
            # not leave the warm-up connections checked out.
            await asyncio.shield(asyncio.gather(*(conn.close() for conn in held)))


async def _connect(engine: AsyncEngine, deadline: float, warm_timeout: float) -> AsyncConnection:
    """Check out one connection, retrying transient failures until ``deadline``."""
    delay = _RETRY_FIRST
    last_error: BaseException | None = None
    while (left := deadline - time.monotonic()) > 0:
        try:
            async with asyncio.timeout(left):
                conn = engine.connect()
                await conn.start()
                return conn
        except TimeoutError:
            pass  # the deadline, or connect_timeout with time left: try again
        except Exception as exc:
            # SQLAlchemy 2.1 wraps a failed connect in a DBAPIError; 2.0 lets
            # the driver's own error (with its SQLSTATE) through unwrapped.
            driver_error = sqlstate_of(exc) is not None
            if not (driver_error or isinstance(exc, OSError | sqlalchemy.exc.DBAPIError)):
                raise
            if _is_permanent(exc):
                raise _unavailable(engine, _driver_reason(exc)) from exc
            last_error = exc
        await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
        delay = min(delay * 2, _RETRY_MAX)
    reason = f"no connection within warm_timeout={warm_timeout:g} s"
    if last_error is not None:
        reason += f"; last error: {_driver_reason(last_error)}"
    raise _unavailable(engine, reason) from last_error


def _succeeded(task: asyncio.Task[AsyncConnection]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _is_permanent(exc: BaseException) -> bool:
    code = sqlstate_of(exc)
    return code is not None and code[:2] in _PERMANENT_SQLSTATE_CLASSES


def _unavailable(engine: AsyncEngine, reason: str) -> DatabaseUnavailableError:
    url = engine.url
    reason = scrub(reason, [url])
    where = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
    return DatabaseUnavailableError(
        f"pool {pool_of(engine).name!r} cannot reach the database at {where} "
        f"as user {url.username or '?'}: {reason}"
    )


def _driver_reason(exc: BaseException) -> str:
    """The innermost driver error as ``Type: message`` (SQLAlchemy's wrapping removed)."""
    driver: BaseException = exc
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        driver = orig
    inner = getattr(driver, "__cause__", None)
    if isinstance(inner, BaseException) and type(driver).__module__.startswith("sqlalchemy"):
        driver = inner  # the asyncpg exception behind SQLAlchemy's adapted one
    message = str(driver).strip().splitlines()[0] if str(driver).strip() else ""
    return f"{type(driver).__name__}: {message}" if message else type(driver).__name__


# ---------------------------------------------------------------------- stop


async def _shutdown(engines: tuple[AsyncEngine, ...], *, drain_timeout: float) -> None:
    pools = [pool_of(engine) for engine in engines]
    for pool in pools:
        pool.state.closed = True
        pool.reject_waiters()  # queued callers fail now, not after being served late
    cancelled: asyncio.CancelledError | None = None
    started = time.monotonic()
    try:
        for pool in pools:
            await pool.upkeep.halt()  # its connect in flight ends; the slot comes free
        await _drain(pools, drain_timeout)
    except asyncio.CancelledError as exc:
        cancelled = exc  # still terminate and dispose below, then re-raise
    # A cancelled drain did not wait drain_timeout: say how long it did wait.
    if cancelled is None:
        why = f"after drain_timeout={drain_timeout:g} s"
    else:
        why = f"when the shutdown was cancelled {time.monotonic() - started:.2f} s into the drain"
    for pool in pools:
        stragglers = pool.terminate_lent(
            DrainTimedOut(f"pool {pool.name!r}: still checked out {why}")
        )
        if stragglers:
            logger.warning(
                "pool %r: %d connections still checked out %s; terminated",
                pool.name,
                stragglers,
                why,
            )
    for pool in pools:
        # Stragglers' statements are cancelled on the server before the
        # pools go (each cleanup is bounded by cleanup_timeout).
        if cancelled is None:
            try:
                await pool.wait_cleaned()
            except asyncio.CancelledError as exc:
                cancelled = exc
        if cancelled is not None:
            pool.abort_cleanups()
    for engine in engines:
        try:
            await engine.dispose()
        except asyncio.CancelledError as exc:
            cancelled = exc
            _abort_idle(pool_of(engine))
        except (Exception, AsyncPoolError):
            logger.exception("disposing %r failed", engine)
    if cancelled is not None:
        raise cancelled


async def _drain(pools: list[FairAsyncPool], drain_timeout: float) -> None:
    events = [pool.all_returned() for pool in pools if pool.checkedout() > 0]
    if not events or drain_timeout <= 0:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(drain_timeout):
            for event in events:
                await event.wait()


def _abort_idle(pool: FairAsyncPool) -> None:
    """Dispose was interrupted: drop what is left without awaiting anything."""
    pool.terminate_lent(DrainTimedOut(f"pool {pool.name!r}: shutdown cancelled"), idle=True)
