"""Starlette and FastAPI glue (extra ``starlette``): lifespan, request sessions, health.

Three pieces, each usable alone:

- ``create_lifespan(*engines, lifespan=...)``: ``Starlette(lifespan=...)`` /
  ``FastAPI(lifespan=...)``. Wraps ``pool_lifespan`` (warm at start-up, drain
  and dispose at shutdown) around your own lifespan, and puts the engines in
  the lifespan state (``request.state.asyncpool_engines``, by pool name).
- ``Sessions(engine)``: one ``AsyncSession`` per request that commits on
  success, rolls back on error, and always gives its connection back, even
  when the client disconnects or the request is cancelled. Checkout is late
  (the first query) and release is early (when the endpoint function
  returns, before the response is sent): ``sessions.depends()`` for FastAPI,
  ``async with sessions.scope()`` for Starlette.
- ``health_endpoint()``: a readiness probe that never queues for a pooled
  connection: 200 with the pool statistics as JSON while every database
  answers, 503 with a reason while one does not or its pool shuts down, and
  "saturated" (200 unless told otherwise) while a pool has no free connection.

**Streaming.** A request's connection must not be held while a response
streams to a slow client. With ``sessions.depends()`` it is not: the session
is committed and closed when the endpoint function returns, before the first
byte is sent, so read what you stream inside the endpoint and stream from
memory. A generator that must query while it streams opens its own short
``async with sessions.scope()`` per batch; the scope gives the connection
back even when the client goes away mid-stream. After release the request's
session refuses further use (``close_resets_only=False``) rather than quietly
checking out a connection that nobody would return.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

import anyio
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import JSONResponse

from ._pool import FairAsyncPool
from ._probe import probe_database
from ._url import redact_url, scrub
from ._validate import check_callable, check_int, check_seconds
from .budget import BudgetMode
from .errors import ConfigurationError
from .lifespan import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_WARM_TIMEOUT,
    check_lifespan_arguments,
    engines_of,
    pool_lifespan,
    pooled_engines,
)
from .stats import statistics

__all__ = ["STATE_KEY", "Sessions", "create_lifespan", "health_endpoint"]

#: Key of the engines (a dict by pool name) in the lifespan state and on ``request.state``.
STATE_KEY: Final = "asyncpool_engines"

#: Seconds a health check may take per database before it counts as unavailable.
DEFAULT_HEALTH_TIMEOUT: Final = 2.0

#: Status code of a saturated pool on a healthy database: still ready. Taking
#: a busy instance out of rotation sends its load to the others, which then
#: saturate in turn; the pool's own queue and ``pool_timeout`` shed load.
DEFAULT_SATURATED_STATUS: Final = 200

#: A pool's state in the health body, worst last.
OK: Final = "ok"
SATURATED: Final = "saturated"
UNAVAILABLE: Final = "unavailable"
SHUTTING_DOWN: Final = "shutting_down"

AppLifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]


def create_lifespan(
    *engines: Any,
    lifespan: AppLifespan | None = None,
    warm: bool = True,
    warm_timeout: float = DEFAULT_WARM_TIMEOUT,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    budget: BudgetMode | None = None,
    processes: int | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan for ``Starlette(lifespan=...)`` or ``FastAPI(lifespan=...)``.

    The pools are warm before ``lifespan`` (yours) starts, so its start-up
    code can use the database, and they are drained only after it has
    finished. The state it yields is kept, and the engines are added under
    ``STATE_KEY``. ``engines`` may include engine groups (objects with an
    ``engines`` attribute).

    ``budget`` and ``processes`` go to ``pool_lifespan``: ``budget="warn"``
    logs the connection budget's arithmetic at start-up when the fleet's
    pools do not fit ``max_connections``, ``budget="enforce"`` refuses to
    start with ``BudgetExceededError``.
    """

    check_lifespan_arguments(
        warm=warm,
        warm_timeout=warm_timeout,
        drain_timeout=drain_timeout,
        budget=budget,
        processes=processes,
    )
    pooled_engines(*engines)
    if lifespan is not None:
        check_callable("lifespan", lifespan, "an app lifespan (app -> async context manager)")

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        async with pool_lifespan(
            *engines,
            warm=warm,
            warm_timeout=warm_timeout,
            drain_timeout=drain_timeout,
            budget=budget,
            processes=processes,
        ) as flat:
            state: dict[str, Any] = {STATE_KEY: {_name(e): e for e in flat}}
            if lifespan is None:
                yield state
                return
            async with lifespan(app) as user_state:
                yield {**(user_state or {}), **state}

    return app_lifespan


class Sessions:
    """Request-scoped ``AsyncSession``s: commit on success, roll back on error.

    ``bind`` is an engine (sessions get ``expire_on_commit=False``, so
    objects stay readable after the early commit, plus ``session_options``)
    or your own ``async_sessionmaker``.
    """

    def __init__(
        self,
        bind: AsyncEngine | async_sessionmaker[AsyncSession],
        **session_options: Any,
    ) -> None:
        if isinstance(bind, async_sessionmaker):
            if session_options:
                name = sorted(session_options)[0]
                raise ConfigurationError(
                    name,
                    session_options[name],
                    "given to your async_sessionmaker, not to Sessions",
                )
            self.sessionmaker: async_sessionmaker[AsyncSession] = bind
        else:
            if not isinstance(bind, AsyncEngine):
                raise ConfigurationError(
                    "bind", type(bind).__name__, "an AsyncEngine or an async_sessionmaker"
                )
            _check_session_options(session_options)
            session_options.setdefault("expire_on_commit", False)
            session_options.setdefault("close_resets_only", False)
            self.sessionmaker = async_sessionmaker(bind, **session_options)

    @contextlib.asynccontextmanager
    async def scope(self) -> AsyncIterator[AsyncSession]:
        """``async with sessions.scope() as session:``; the Starlette helper.

        On a normal exit the session commits; on an exception it rolls back;
        when cancelled (client gone, server shutting down) its connection is
        discarded without a round trip, since its state is unknown. In every
        case the connection is back in the pool when the block ends.
        """
        session = self.sessionmaker()
        try:
            yield session
        except BaseException as exc:
            await _finish(session, exc)
            raise
        await _finish(session, None)

    async def dependency(self) -> AsyncIterator[AsyncSession]:
        """A FastAPI dependency with ``yield``; prefer ``depends()``, which sets its scope."""
        async with self.scope() as session:
            yield session

    def depends(self) -> Any:
        """``Depends(...)`` ending the session when the endpoint function returns.

        FastAPI's ``scope="function"`` runs the commit before the response is
        sent, so a failed commit still turns into an error response and no
        connection is held while the response is sent or streamed.
        """
        from fastapi import Depends  # the FastAPI half only: Starlette apps never get here

        try:
            return Depends(self.dependency, scope="function")
        except TypeError:  # pragma: no cover - FastAPI without dependency scopes
            return Depends(self.dependency)


async def _finish(session: AsyncSession, error: BaseException | None) -> None:
    """Commit, or roll back, or discard; the connection is given back in every case.

    Shielded from anyio cancel scopes (which re-cancel at every await); if a
    native cancellation still interrupts, the connection is invalidated,
    which needs no await that could be interrupted.
    """
    try:
        with anyio.CancelScope(shield=True):
            if error is None:
                try:
                    await session.commit()
                finally:
                    await session.close()
            elif isinstance(error, Exception):
                await session.close()  # rolls back
            else:
                await session.invalidate()  # cancelled mid-request: no round trip
    except BaseException:
        await session.invalidate()
        raise


def health_endpoint(
    *engines: Any,
    timeout: float = DEFAULT_HEALTH_TIMEOUT,
    saturated_status: int = DEFAULT_SATURATED_STATUS,
) -> Callable[[Request], Awaitable[JSONResponse]]:
    """An endpoint for readiness probes: ``app.add_route("/health", health_endpoint())``.

    Checks every engine (given here, else those of ``create_lifespan`` from
    the request state) without ever waiting in its pool's queue, so it
    answers within ``timeout`` seconds however busy the pools are:

    - the database: ``SELECT 1`` on a separate, short-lived connection opened
      with the engine's own connect arguments, bounded by ``timeout``; one
      per pool at a time, shared by concurrent requests;
    - saturation: from ``statistics(engine)``. A pool is saturated when no
      connection is free for a new caller: ``checked_out >= max_size``, or
      callers already queue (``waiting > 0``). A pool without an overflow
      limit saturates only when callers queue.

    Each pool gets a ``"state"``: ``ok``, ``saturated``, ``unavailable`` (the
    database did not answer in time or refused) or ``shutting_down``. The
    body's ``"status"`` is the worst of them (``shutting_down`` counts as
    ``unavailable``), with a ``"reason"`` unless ``ok``:

    - 200 ``{"status": "ok", "pools": {name: statistics + state}}``;
    - ``saturated_status`` (default 200: a busy instance on a healthy
      database stays in rotation, since removing it only moves its load to
      the others) ``{"status": "saturated", ...}``; pass 503 to shed load;
    - 503 ``{"status": "unavailable", ...}`` when a database does not answer
      or its pool is shutting down (so a draining instance leaves the load
      balancer first).
    """
    check_seconds("timeout", timeout, allow_zero=False)
    check_int("saturated_status", saturated_status, low=200, high=599)
    fixed = engines_of(*engines) if engines else None

    async def health(request: Request) -> JSONResponse:
        targets = fixed if fixed is not None else _engines_from_state(request)
        checks = await asyncio.gather(*(_check(engine, timeout) for engine in targets))
        pools = {_name(engine): pool for engine, (pool, _) in zip(targets, checks, strict=True)}
        states = {pool["state"] for pool, _ in checks}
        if states & {UNAVAILABLE, SHUTTING_DOWN}:
            status, code = UNAVAILABLE, 503
        elif SATURATED in states:
            status, code = SATURATED, saturated_status
        else:
            status, code = OK, 200
        body: dict[str, Any] = {"status": status, "pools": pools}
        reasons = [reason for _, reason in checks if reason is not None]
        if reasons:
            body["reason"] = "; ".join(reasons)
        return JSONResponse(body, status_code=code)

    return health


def _check_session_options(options: Mapping[str, Any]) -> None:
    """Options ``AsyncSession`` takes, named when unknown (else the first request fails)."""
    sync_class = options.get("sync_session_class") or Session
    if not (isinstance(sync_class, type) and issubclass(sync_class, Session)):
        raise ConfigurationError(
            "sync_session_class", type(sync_class).__name__, "a subclass of sqlalchemy.orm.Session"
        )
    known = {"binds", "sync_session_class"}
    for name, parameter in inspect.signature(sync_class.__init__).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return  # the class takes anything
        known.add(name)
    known -= {"self", "bind"}
    for name in sorted(options):
        if name not in known:
            raise ConfigurationError(
                name, options[name], f"an AsyncSession option, one of {', '.join(sorted(known))}"
            )
    for flag in ("expire_on_commit", "close_resets_only", "autoflush", "autobegin"):
        if flag in options and not isinstance(options[flag], bool):
            raise ConfigurationError(flag, options[flag], "True or False")


def _engines_from_state(request: Request) -> tuple[AsyncEngine, ...]:
    found = getattr(request.state, STATE_KEY, None)
    if not found:
        raise RuntimeError(
            "health_endpoint() without engines needs create_lifespan() as the app's lifespan"
        )
    return tuple(found.values())


async def _check(engine: AsyncEngine, seconds: float) -> tuple[dict[str, Any], str | None]:
    """A pool's statistics with its ``state`` and, unless ``ok``, why.

    Never a checkout from the pool: the database is probed on a connection
    of its own, the saturation read from the statistics afterwards.
    """
    name = _name(engine)
    pool = engine.sync_engine.pool
    if isinstance(pool, FairAsyncPool) and pool.state.closed:
        return _entry(engine, SHUTTING_DOWN), f"pool {name!r} is shutting down"
    problem = await probe_database(engine, seconds)
    if problem is not None:
        reason = scrub(f"pool {name!r}: database unavailable: {problem}", [engine.url])
        return _entry(engine, UNAVAILABLE), reason
    if not isinstance(pool, FairAsyncPool):
        return _entry(engine, OK), None
    stats = statistics(engine)
    full = stats.max_size is not None and stats.checked_out >= stats.max_size
    if not (full or stats.waiting > 0):
        return {**stats.as_dict(), "state": OK}, None
    limit = "no limit" if stats.max_size is None else str(stats.max_size)
    reason = (
        f"pool {name!r} is saturated: {stats.checked_out} checked out of {limit},"
        f" {stats.waiting} waiting"
    )
    return {**stats.as_dict(), "state": SATURATED}, reason


def _entry(engine: AsyncEngine, state: str) -> dict[str, Any]:
    return {**_statistics(engine), "state": state}


def _name(engine: AsyncEngine) -> str:
    """The pool name; for an engine not on asyncpool's pool (a group's NullPool
    analytics engine), its logging name or its URL without the password."""
    pool = engine.sync_engine.pool
    name = getattr(pool, "name", None) or getattr(pool, "logging_name", None)
    return str(name) if name else redact_url(engine.url)


def _statistics(engine: AsyncEngine) -> dict[str, Any]:
    if isinstance(engine.sync_engine.pool, FairAsyncPool):
        return statistics(engine).as_dict()
    return {"pooled": False}
