"""connection_budget(): does the whole fleet's pooling fit in max_connections?

Every process has its own pools, so the fleet can open
processes x sum over engines of (pool_size + max_overflow) connections. Nothing
in SQLAlchemy or asyncpg knows that total, and the first sign that it is too
large is "sorry, too many clients already" on the busiest day. This module
reads what the server allows and does the arithmetic, per server (replicas
have their own ``max_connections``):

    available = max_connections - superuser_reserved_connections
                - reserved_connections - connections of others - reserve
    would open = processes x (sum of the engines' maxima on that server)

and suggests per-engine sizes that fit. ``check_budget`` (what
``pool_lifespan(budget=...)`` calls) logs the arithmetic or refuses to start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from ._validate import ENGINES_EXPECTED, check_int
from .engine import pool_of
from .errors import BudgetExceededError, ConfigurationError
from .routing import application_name_of

__all__ = [
    "BudgetMode",
    "ConnectionBudget",
    "EngineBudget",
    "ServerBudget",
    "check_budget",
    "check_budget_mode",
    "connection_budget",
    "processes_from_env",
]

logger = logging.getLogger("asyncpool.budget")

BudgetMode = Literal["warn", "enforce"]
_MODES: Final = ("warn", "enforce")

#: Where the process count comes from when not given: ours, then the
#: convention of gunicorn/uvicorn deployments.
_PROCESS_VARIABLES: Final = ("ASYNCPOOL_PROCESSES", "WEB_CONCURRENCY")

#: One round trip: the limits, and who uses the server now: client backends
#: (autovacuum, WAL senders and background workers have slots of their own).
#: A role without pg_read_all_stats sees no backend_type for other roles'
#: sessions; counting those with a database errs towards "in use".
_READ_SERVER: Final = text(
    """
    SELECT current_setting('max_connections')::int AS max_connections,
           current_setting('superuser_reserved_connections')::int AS superuser_reserved,
           coalesce(current_setting('reserved_connections', true), '0')::int AS reserved,
           count(*) FILTER (WHERE a.application_name = ANY(:names)) AS ours,
           count(*) AS in_use
      FROM pg_stat_activity AS a
     WHERE a.pid <> pg_backend_pid() AND a.datid IS NOT NULL
       AND coalesce(a.backend_type, 'client backend') = 'client backend'
    """
)


@dataclass(frozen=True, slots=True)
class EngineBudget:
    """One engine's share, per process; ``suggested_*`` fit the budget (equal when it fits)."""

    name: str
    role: str
    pool_size: int
    max_overflow: int
    suggested_pool_size: int
    suggested_max_overflow: int
    #: ``PoolConfig.pooler``: behind a pooler, its pool (not this one) bounds the server's use.
    pooler: str | None = None
    #: Pools the engine may hold: ``max_loops`` with ``pool_per_loop``, else 1.
    loops: int = 1

    @property
    def max_connections(self) -> int:
        return (self.pool_size + self.max_overflow) * self.loops

    @property
    def suggested_max_connections(self) -> int:
        return (self.suggested_pool_size + self.suggested_max_overflow) * self.loops

    @property
    def suggested_settings(self) -> dict[str, int]:
        """The suggestion as settings to pass: ``PoolConfig``'s, or ``analytics_limit``.

        An analytics engine has no pool (``NullPool``: ``pool_size`` 0, one
        connection per session); ``EngineGroup(analytics_limit=...)`` bounds
        it, so that is what is suggested for it. A pooled engine gets a
        ``pool_size`` of at least 1, as ``PoolConfig`` requires.
        """
        if self.pool_size == 0:
            return {"analytics_limit": max(self.suggested_max_overflow, 1)}
        return {
            "pool_size": max(self.suggested_pool_size, 1),
            "max_overflow": self.suggested_max_overflow,
        }


@dataclass(frozen=True, slots=True)
class ServerBudget:
    """The arithmetic for one server (host:port) and the engines that use it."""

    server: str
    max_connections: int
    superuser_reserved_connections: int
    #: ``reserved_connections`` (PostgreSQL 16+), 0 before.
    reserved_connections: int
    #: Client connections open now under none of these engines' ``application_name``.
    in_use_by_others: int
    #: Head-room kept free on purpose (admin sessions, migrations, cron).
    reserve: int
    processes: int
    engines: tuple[EngineBudget, ...]

    @property
    def available(self) -> int:
        """Connections the fleet may open on this server."""
        return max(
            self.max_connections
            - self.superuser_reserved_connections
            - self.reserved_connections
            - self.in_use_by_others
            - self.reserve,
            0,
        )

    @property
    def per_process(self) -> int:
        return sum(e.max_connections for e in self.engines)

    @property
    def would_open(self) -> int:
        """Connections the fleet may open at worst: processes x per process."""
        return self.processes * self.per_process

    @property
    def fits(self) -> bool:
        return self.would_open <= self.available

    @property
    def suggestion_fits(self) -> bool:
        """False when even one connection per engine and process is too many."""
        suggested = sum(e.suggested_max_connections for e in self.engines)
        return self.processes * suggested <= self.available and all(
            e.suggested_max_connections > 0 for e in self.engines
        )

    def explain(self) -> str:
        """The arithmetic as one paragraph (what warnings and errors say)."""
        limits = (
            f"max_connections {self.max_connections} "
            f"- superuser_reserved_connections {self.superuser_reserved_connections} "
            f"- reserved_connections {self.reserved_connections} "
            f"- {self.in_use_by_others} in use by others - reserve {self.reserve} "
            f"= {self.available} available"
        )
        shares = " + ".join(f"{e.name} {e.max_connections}" for e in self.engines)
        opens = (
            f"{self.processes} processes x {self.per_process} per process ({shares}) "
            f"= {self.would_open} at most"
        )
        if self.fits:
            return f"{self.server}: {opens} <= {limits}: fits"
        text_ = f"{self.server}: {opens} > {limits}: {self.would_open - self.available} too many"
        if not self.suggestion_fits:
            return text_ + "; even 1 connection per engine and process does not fit"
        sizes = ", ".join(
            " ".join([e.name, *(f"{k}={v}" for k, v in e.suggested_settings.items())])
            for e in self.engines
        )
        total = sum(e.suggested_max_connections for e in self.engines)
        return (
            f"{text_}. Fits with: {sizes} ({self.processes} x {total} = {self.processes * total})"
        )


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """The budget of every server the engines use; ``fits`` only if all fit."""

    processes: int
    servers: tuple[ServerBudget, ...]
    #: Engines behind a pooler (PgBouncer): the pooler's own pool bounds them.
    not_counted: tuple[EngineBudget, ...] = ()

    @property
    def fits(self) -> bool:
        return all(server.fits for server in self.servers)

    def explain(self) -> str:
        lines = [server.explain() for server in self.servers]
        if self.not_counted:
            names = ", ".join(f"{e.name} ({e.pooler})" for e in self.not_counted)
            lines.append(f"not counted, behind a pooler that bounds them: {names}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


async def connection_budget(*engines: Any, processes: int, reserve: int = 0) -> ConnectionBudget:
    """Read the servers' limits and compute the fleet's budget.

    ``engines``: engines and groups (anything with ``engines``, like
    ``EngineGroup``); ``processes``: how many processes run these same engines
    (workers x pods); ``reserve``: connections to keep free on each server.
    Opens one connection per server, through the first engine that uses it.
    """
    check_int("processes", processes, low=1)
    check_int("reserve", reserve, low=0)
    members = _members(engines)
    behind_pooler = tuple(share for _, share in members if share.pooler is not None)
    by_server: dict[str, list[tuple[AsyncEngine, EngineBudget]]] = {}
    for engine, share in members:
        if share.pooler is not None:
            continue
        url = engine.url
        by_server.setdefault(f"{url.host or 'localhost'}:{url.port or 5432}", []).append(
            (engine, share)
        )
    servers = []
    for server, shares in by_server.items():
        names = sorted({application_name_of(engine) for engine, _ in shares})
        async with shares[0][0].connect() as conn:
            row = (await conn.execute(_READ_SERVER, {"names": names})).one()
        budget = ServerBudget(
            server=server,
            max_connections=row.max_connections,
            superuser_reserved_connections=row.superuser_reserved,
            reserved_connections=row.reserved,
            in_use_by_others=row.in_use - row.ours,
            reserve=reserve,
            processes=processes,
            engines=tuple(share for _, share in shares),
        )
        servers.append(_with_suggestions(budget))
    return ConnectionBudget(processes=processes, servers=tuple(servers), not_counted=behind_pooler)


async def check_budget(
    engines: Iterable[Any],
    processes: int | None,
    mode: BudgetMode | None,
    *,
    reserve: int = 0,
) -> ConnectionBudget | None:
    """Check the budget at start-up: ``"warn"`` logs, ``"enforce"`` raises if it does not fit.

    ``engines``: engines and groups, as for ``connection_budget``.
    ``processes=None`` reads ``ASYNCPOOL_PROCESSES``, then ``WEB_CONCURRENCY``,
    else 1. ``mode=None`` checks nothing. Raises ``BudgetExceededError`` with
    the arithmetic and sizes that fit.
    """
    check_budget_mode(mode)
    if processes is not None:
        check_int("processes", processes, low=1)
    check_int("reserve", reserve, low=0)
    if mode is None:
        return None
    if processes is None:
        processes = processes_from_env()
    budget = await connection_budget(*engines, processes=processes, reserve=reserve)
    if budget.fits:
        logger.info("connection budget: %s", budget.explain())
        return budget
    message = f"connection budget exceeded: {budget.explain()}"
    if mode == "enforce":
        raise BudgetExceededError(message, budget)
    logger.warning("%s", message)
    return budget


def check_budget_mode(mode: object) -> None:
    """``budget=`` is ``None``, ``"warn"`` or ``"enforce"``."""
    if mode is not None and (not isinstance(mode, str) or mode not in _MODES):
        raise ConfigurationError("budget", mode, "None, 'warn' or 'enforce'")


def processes_from_env(environ: Mapping[str, str] | None = None) -> int:
    """Processes sharing the budget: ``ASYNCPOOL_PROCESSES``, ``WEB_CONCURRENCY``, else 1."""
    env = os.environ if environ is None else environ
    for variable in _PROCESS_VARIABLES:
        raw = env.get(variable, "").strip()
        if raw:
            try:
                value = int(raw)
            except ValueError:
                raise ConfigurationError(variable, raw, "a whole number of processes") from None
            check_int(variable, value, low=1)
            return value
    return 1


# --------------------------------------------------------------------- helpers


def _members(items: tuple[Any, ...]) -> list[tuple[AsyncEngine, EngineBudget]]:
    """Each engine once, with its role and per-process maximum."""
    found: dict[int, tuple[AsyncEngine, EngineBudget]] = {}
    for item in items:
        if isinstance(item, AsyncEngine):
            found.setdefault(id(item), (item, _share(item)))
            continue
        members = getattr(item, "members", None)
        if members is not None:  # an EngineGroup: roles and the analytics limit
            for member in members:
                share = EngineBudget(
                    member.name,
                    member.role,
                    member.pool_size,
                    member.max_overflow,
                    member.pool_size,
                    member.max_overflow,
                    member.pooler,
                    _loops_of(member.engine),
                )
                found.setdefault(id(member.engine), (member.engine, share))
            continue
        engines = getattr(item, "engines", None)
        if engines is None or isinstance(engines, str | bytes):
            raise ConfigurationError("engines", type(item).__name__, ENGINES_EXPECTED)
        for engine, share in _members(tuple(engines)):
            found.setdefault(id(engine), (engine, share))
    return list(found.values())


def _share(engine: AsyncEngine) -> EngineBudget:
    if isinstance(engine.sync_engine.pool, NullPool):
        raise ConfigurationError(
            "engine",
            engine.sync_engine.pool.logging_name or "a NullPool engine",
            "an engine with a bounded pool; put a NullPool engine in an EngineGroup as "
            "analytics, where analytics_limit bounds it",
        )
    pool = pool_of(engine)
    config = pool.state.config
    return EngineBudget(
        pool.name,
        "engine",
        config.pool_size,
        config.max_overflow,
        config.pool_size,
        config.max_overflow,
        config.pooler,
        config.loops,
    )


def _loops_of(engine: AsyncEngine) -> int:
    pool = engine.sync_engine.pool
    state = getattr(pool, "state", None)
    return state.config.loops if state is not None else 1


def _with_suggestions(budget: ServerBudget) -> ServerBudget:
    """Scale every engine down in proportion until processes x total fits."""
    if budget.fits:
        return budget
    cap = budget.available // budget.processes
    engines = budget.engines
    total = sum(e.max_connections for e in engines) or 1
    exact = [cap * e.max_connections / total for e in engines]
    shares = [max(1, int(x)) for x in exact]
    # Largest remainder first: hand out what rounding down left over.
    for index in sorted(range(len(engines)), key=lambda i: int(exact[i]) - exact[i]):
        if sum(shares) >= cap:
            break
        if exact[index] > shares[index]:
            shares[index] += 1
    while sum(shares) > cap and max(shares) > 1:
        shares[shares.index(max(shares))] -= 1
    suggested = []
    for engine, share in zip(engines, shares, strict=True):
        per_pool = max(share // engine.loops, 1)  # pool_per_loop: max_loops pools share it
        if engine.pool_size == 0:  # NullPool: every connection is opened on demand
            pool_size = 0
        else:
            wanted = engine.pool_size + engine.max_overflow
            pool_size = min(per_pool, max(1, round(per_pool * engine.pool_size / wanted)))
        suggested.append(
            EngineBudget(
                engine.name,
                engine.role,
                engine.pool_size,
                engine.max_overflow,
                pool_size,
                per_pool - pool_size,
                engine.pooler,
                engine.loops,
            )
        )
    return ServerBudget(
        server=budget.server,
        max_connections=budget.max_connections,
        superuser_reserved_connections=budget.superuser_reserved_connections,
        reserved_connections=budget.reserved_connections,
        in_use_by_others=budget.in_use_by_others,
        reserve=budget.reserve,
        processes=budget.processes,
        engines=tuple(suggested),
    )
