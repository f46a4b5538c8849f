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
- ``health_endpoint()``: 200 with the pool statistics as JSON while every
  database answers, 503 with a reason while one does not (readiness probes).

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
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import JSONResponse

from ._pool import FairAsyncPool
from ._url import redact_url, scrub
from ._validate import check_callable, check_seconds
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

AppLifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]


def create_lifespan(
    *engines: Any,
    lifespan: AppLifespan | None = None,
    warm: bool = True,
    warm_timeout: float = DEFAULT_WARM_TIMEOUT,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan for ``Starlette(lifespan=...)`` or ``FastAPI(lifespan=...)``.

    The pools are warm before ``lifespan`` (yours) starts, so its start-up
    code can use the database, and they are drained only after it has
    finished. The state it yields is kept, and the engines are added under
    ``STATE_KEY``. ``engines`` may include engine groups (objects with an
    ``engines`` attribute).
    """

    check_lifespan_arguments(warm=warm, warm_timeout=warm_timeout, drain_timeout=drain_timeout)
    pooled_engines(*engines)
    if lifespan is not None:
        check_callable("lifespan", lifespan, "an app lifespan (app -> async context manager)")

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        async with pool_lifespan(
            *engines, warm=warm, warm_timeout=warm_timeout, drain_timeout=drain_timeout
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
    *engines: Any, timeout: float = DEFAULT_HEALTH_TIMEOUT
) -> Callable[[Request], Awaitable[JSONResponse]]:
    """An endpoint for readiness probes: ``app.add_route("/health", health_endpoint())``.

    Checks every engine (given here, else those of ``create_lifespan`` from
    the request state) with ``SELECT 1`` on a pooled connection, bounded by
    ``timeout`` seconds. 200 ``{"status": "ok", "pools": {...}}`` with each
    pool's statistics; 503 ``{"status": "unavailable", "reason": ...}`` when
    a database does not answer in time, errors, or its pool is shutting down
    (so a draining instance leaves the load balancer first).
    """
    check_seconds("timeout", timeout, allow_zero=False)
    fixed = engines_of(*engines) if engines else None

    async def health(request: Request) -> JSONResponse:
        targets = fixed if fixed is not None else _engines_from_state(request)
        reasons = await asyncio.gather(*(_check(engine, timeout) for engine in targets))
        failed = [reason for reason in reasons if reason is not None]
        body: dict[str, Any] = {
            "status": "unavailable" if failed else "ok",
            "pools": {_name(e): _statistics(e) for e in targets},
        }
        if failed:
            body["reason"] = "; ".join(failed)
        return JSONResponse(body, status_code=503 if failed else 200)

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


async def _check(engine: AsyncEngine, seconds: float) -> str | None:
    """None when the database answers ``SELECT 1`` within ``seconds``, else why not."""
    name = _name(engine)
    pool = engine.sync_engine.pool
    if isinstance(pool, FairAsyncPool) and pool.state.closed:
        return f"pool {name!r} is shutting down"
    try:
        with anyio.fail_after(seconds):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except TimeoutError:
        return f"pool {name!r}: no answer within {seconds:g} s"
    except Exception as exc:
        reason = f"pool {name!r}: {type(exc).__name__}: {_first_line(exc)}"
        return scrub(reason, [engine.url])
    return None


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


def _first_line(exc: BaseException) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else ""
