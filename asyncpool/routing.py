"""EngineGroup: a primary, read replicas and an analytics engine, routed by intent.

A service that outgrows one database adds replicas and an analytics
connection, each with its own pool, name and settings. ``EngineGroup`` keeps
them together and hands out ``AsyncSession`` objects on the right one:

* ``session(route="write")``: the primary.
* ``session(route="read")``: a healthy replica, round robin. A replica that
  does not answer is skipped for ``retry_interval`` seconds; while none
  answers, reads go to the primary (``replica_fallbacks`` counts them), so a
  stopped replica costs at most one ``pool_timeout + connect_timeout``, not
  an error. Statements that must see or lock the primary's data go there:
  writes and ``SELECT ... FOR UPDATE`` / ``FOR SHARE``.
* ``session(route="analytics")``: the analytics engine (``NullPool``: a
  connection per session, closed after it), at most ``analytics_limit``
  sessions at once per process. Without one, analytics reads are reads.

**Read-your-writes.** A replica lags. After a write, reads stay on the
primary for the rest of the session, for the rest of a ``request_scope()``
(a web request), and, in the task that wrote, for ``sticky_window`` seconds.

``engines`` lists every engine, so ``pool_lifespan(group)`` warms and
disposes them all and ``connection_budget(group, processes=N)`` counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import SelectBase

from ._pool import next_pool_name
from ._url import redact_url
from ._validate import (
    NAME_MAX,
    check_int,
    check_mapping,
    check_name,
    check_seconds,
    check_sequence,
)
from .config import PoolConfig
from .engine import connect_args_for, create_pooled_engine, parse_url, pool_of, with_url_settings
from .errors import AsyncPoolError, ConfigurationError, PoolTimeoutError

__all__ = [
    "EngineGroup",
    "GroupMember",
    "Route",
    "RoutingStatistics",
    "application_name_of",
    "create_analytics_engine",
    "statement_needs_primary",
]

logger = logging.getLogger("asyncpool.routing")

Route = Literal["write", "read", "analytics"]
_ROUTES: Final = ("write", "read", "analytics")

#: Seconds a replica that did not answer is left alone before it is tried again.
DEFAULT_RETRY_INTERVAL: Final = 5.0
#: Seconds after a write during which the task that wrote reads from the primary.
DEFAULT_STICKY_WINDOW: Final = 1.0
#: Analytics sessions (each one connection, NullPool) open at once per process.
DEFAULT_ANALYTICS_LIMIT: Final = 2

#: Text statements that only read; anything else goes to the primary.
_READ_ONLY_TEXT: Final = re.compile(r"\s*\(?\s*(?:SELECT|WITH|SHOW|VALUES|TABLE)\b", re.IGNORECASE)
#: Words that make a read-looking statement write, lock or advance a sequence.
_NEEDS_PRIMARY: Final = re.compile(
    r"\b(?:INSERT|UPDATE|DELETE|MERGE|FOR\s+(?:NO\s+KEY\s+)?UPDATE|FOR\s+(?:KEY\s+)?SHARE"
    r"|NEXTVAL|SETVAL|PG_ADVISORY_\w*LOCK\w*)\b",
    re.IGNORECASE,
)

#: The request scope, if any: a set of group keys that wrote in it (shared, mutable).
_scope: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar(
    "asyncpool_routing_scope", default=None
)
#: Per task: group key -> monotonic time of its last write seen in this context.
_last_write: contextvars.ContextVar[tuple[tuple[int, float], ...]] = contextvars.ContextVar(
    "asyncpool_last_write", default=()
)
_group_keys: Iterator[int] = itertools.count(1)

#: The settings an analytics (NullPool) engine was created with.
_unpooled_configs: weakref.WeakKeyDictionary[Engine, PoolConfig] = weakref.WeakKeyDictionary()

#: Where a group session keeps its router, in ``Session.info``.
_ROUTER: Final = "asyncpool.routing.router"


def statement_needs_primary(statement: Any, dialect: Any = None) -> bool:
    """True for statements a replica cannot run or would answer stale.

    Writes (``INSERT``/``UPDATE``/``DELETE``, DDL), locking reads
    (``FOR UPDATE``/``FOR SHARE``) and text that does not start like a read.
    A ``SELECT`` is compiled to find a locking clause (the only public way to
    see it); text is matched by keywords, erring towards the primary.
    """
    if statement is None:
        return False
    if isinstance(statement, UpdateBase):
        return True
    if isinstance(statement, TextClause):
        sql = statement.text
        return not _READ_ONLY_TEXT.match(sql) or bool(_NEEDS_PRIMARY.search(sql))
    if isinstance(statement, SelectBase):
        try:
            sql = str(statement.compile(dialect=dialect))
        except Exception:
            return True  # cannot tell: the primary can run anything
        return bool(_NEEDS_PRIMARY.search(sql))
    return True  # DDL and anything else that is not a plain read


@dataclass(frozen=True, slots=True)
class GroupMember:
    """One engine of a group: its role and what it may open per process."""

    role: Literal["primary", "replica", "analytics"]
    name: str
    engine: AsyncEngine
    #: Connections kept open (0 for the NullPool analytics engine).
    pool_size: int
    #: Connections opened on demand and closed after use (the analytics limit for NullPool).
    max_overflow: int
    #: ``PoolConfig.pooler`` of the engine (``"pgbouncer"`` or None).
    pooler: str | None = None

    @property
    def max_connections(self) -> int:
        """The most connections this engine opens at once in one process."""
        return self.pool_size + self.max_overflow


@dataclass(frozen=True, slots=True)
class RoutingStatistics:
    """Counters of one group since it was created, and the replicas now skipped."""

    #: Read sessions served by a replica.
    replica_reads: int
    #: Read sessions kept on the primary by read-your-writes.
    sticky_reads: int
    #: Read sessions sent to the primary because no replica answered.
    replica_fallbacks: int
    #: Attempts to reach a replica that failed (each marks it down for ``retry_interval``).
    replica_failures: int
    #: Read sessions moved from a replica to the primary by a write or a locking read.
    moved_to_primary: int
    #: Names of the replicas skipped right now.
    replicas_down: tuple[str, ...]


class _Replica:
    __slots__ = ("down_until", "engine", "name", "probing")

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.name = _engine_name(engine)
        self.down_until = 0.0
        self.probing = False


class _Counters:
    __slots__ = (
        "moved_to_primary",
        "replica_failures",
        "replica_fallbacks",
        "replica_reads",
        "sticky_reads",
    )

    def __init__(self) -> None:
        self.replica_reads = 0
        self.sticky_reads = 0
        self.replica_fallbacks = 0
        self.replica_failures = 0
        self.moved_to_primary = 0


class EngineGroup:
    """Named engines with roles; ``session(route=...)`` picks one.

    Build it from engines made by ``create_pooled_engine`` (and
    ``create_analytics_engine``), or from URLs with ``EngineGroup.create``.
    """

    def __init__(
        self,
        primary: AsyncEngine,
        replicas: Sequence[AsyncEngine] = (),
        analytics: AsyncEngine | None = None,
        *,
        sticky_window: float = DEFAULT_STICKY_WINDOW,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        analytics_limit: int = DEFAULT_ANALYTICS_LIMIT,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(primary, AsyncEngine):
            raise ConfigurationError("primary", type(primary).__name__, "an AsyncEngine")
        replicas = check_sequence(
            "replicas", replicas, _is_engine, items="AsyncEngines", item="an AsyncEngine"
        )
        if analytics is not None and not isinstance(analytics, AsyncEngine):
            raise ConfigurationError(
                "analytics", type(analytics).__name__, "an AsyncEngine or None"
            )
        _check_group_options(
            {
                "sticky_window": sticky_window,
                "retry_interval": retry_interval,
                "analytics_limit": analytics_limit,
                "session_options": session_options,
            }
        )
        engines = [primary, *replicas, *([analytics] if analytics is not None else [])]
        if len({id(e) for e in engines}) != len(engines):
            raise ConfigurationError("engines", "the same engine twice", "distinct engines")
        self.primary = primary
        self.replicas = tuple(replicas)
        self.analytics = analytics
        self.sticky_window = float(sticky_window)
        self.retry_interval = float(retry_interval)
        self.analytics_limit = analytics_limit
        self._session_options = {"expire_on_commit": False, **(session_options or {})}
        self._replicas = [_Replica(engine) for engine in self.replicas]
        self._next_replica = 0
        self._analytics_slots = asyncio.Semaphore(analytics_limit)
        self._counters = _Counters()
        self._key = next(_group_keys)
        self.members = tuple(self._member(role, e) for role, e in self._roles())

    @classmethod
    def create(
        cls,
        primary: str | URL,
        *,
        replicas: Sequence[str | URL] = (),
        analytics: str | URL | None = None,
        name: str = "db",
        config: PoolConfig | None = None,
        replica_config: PoolConfig | None = None,
        analytics_config: PoolConfig | None = None,
        engine_options: Mapping[str, Any] | None = None,
        **group_options: Any,
    ) -> EngineGroup:
        """Create the engines and the group: pools named ``<name>-primary``,
        ``<name>-replica-1`` ..., ``<name>-analytics``.

        ``config`` is the primary's pool; replicas use ``replica_config``
        (default: ``config``); the analytics engine takes ``connect_timeout``,
        ``command_timeout``, ``application_name`` and ``pooler`` from
        ``analytics_config`` (default: ``config``).
        """
        _check_url("primary", primary)
        replicas = check_sequence(
            "replicas", replicas, _is_url, items="database URLs", item="a database URL"
        )
        for index, url in enumerate(replicas):
            _check_url(f"replicas[{index}]", url)
        if analytics is not None:
            _check_url("analytics", analytics)
        suffix = max(len("-analytics"), len(f"-replica-{len(replicas)}"))
        check_name("name", name, optional=False, max_length=NAME_MAX - suffix)
        for setting, value in (
            ("config", config),
            ("replica_config", replica_config),
            ("analytics_config", analytics_config),
        ):
            if value is not None and not isinstance(value, PoolConfig):
                raise ConfigurationError(setting, type(value).__name__, "a PoolConfig or None")
        check_mapping("engine_options", engine_options)
        _check_group_options(group_options)
        config = config if config is not None else PoolConfig()
        replica_config = replica_config if replica_config is not None else config
        analytics_config = analytics_config if analytics_config is not None else config
        created: list[AsyncEngine] = []
        try:
            created.append(
                create_pooled_engine(
                    primary, config.replace(name=f"{name}-primary"), engine_options=engine_options
                )
            )
            for index, url in enumerate(replicas, start=1):
                replica = replica_config.replace(name=f"{name}-replica-{index}")
                created.append(create_pooled_engine(url, replica, engine_options=engine_options))
            analytics_engine = None
            if analytics is not None:
                analytics_engine = create_analytics_engine(
                    analytics,
                    analytics_config.replace(name=f"{name}-analytics"),
                    engine_options=engine_options,
                )
            return cls(created[0], created[1:], analytics_engine, **group_options)
        except BaseException:
            for engine in created:
                engine.sync_engine.dispose(close=False)
            raise

    # ----------------------------------------------------------------- members

    @property
    def engines(self) -> tuple[AsyncEngine, ...]:
        """Every engine: primary, replicas, analytics (for ``pool_lifespan``)."""
        return tuple(member.engine for member in self.members)

    def _roles(self) -> Iterator[tuple[Literal["primary", "replica", "analytics"], AsyncEngine]]:
        yield "primary", self.primary
        for replica in self.replicas:
            yield "replica", replica
        if self.analytics is not None:
            yield "analytics", self.analytics

    def _member(
        self, role: Literal["primary", "replica", "analytics"], engine: AsyncEngine
    ) -> GroupMember:
        name = _engine_name(engine)
        if isinstance(engine.sync_engine.pool, NullPool):
            limit = self.analytics_limit if role == "analytics" else 0
            unpooled = _unpooled_configs.get(engine.sync_engine)
            return GroupMember(role, name, engine, 0, limit, unpooled.pooler if unpooled else None)
        config = pool_of(engine).state.config
        return GroupMember(role, name, engine, config.pool_size, config.max_overflow, config.pooler)

    def __repr__(self) -> str:
        names = ", ".join(f"{m.role}={m.name!r}" for m in self.members)
        return f"<EngineGroup {names}>"

    # ---------------------------------------------------------------- sessions

    @contextlib.asynccontextmanager
    async def session(self, route: Route = "read", **options: Any) -> AsyncIterator[AsyncSession]:
        """An ``AsyncSession`` on the engine for ``route``; closed on exit.

        ``options`` go to ``AsyncSession`` (default ``expire_on_commit=False``).
        """
        if route not in _ROUTES:
            raise ConfigurationError("route", route, "'write', 'read' or 'analytics'")
        if route == "analytics" and self.analytics is not None:
            async with self._analytics_slots:
                async with self._new_session(self.analytics, None, options) as session:
                    yield session
            return
        if route == "write":
            router = _Router(self, read_bind=None)
            async with self._new_session(self.primary, router, options) as session:
                yield session
            return
        replica_conn: AsyncConnection | None = None
        if self._sticky():
            self._counters.sticky_reads += 1
        elif self._replicas:
            replica_conn = await self._replica_connection()
            if replica_conn is None:
                self._counters.replica_fallbacks += 1
            else:
                self._counters.replica_reads += 1
        read_bind = replica_conn.sync_connection if replica_conn is not None else None
        router = _Router(self, read_bind=read_bind)
        try:
            async with self._new_session(self.primary, router, options) as session:
                yield session
        finally:
            if replica_conn is not None:
                await replica_conn.close()

    @contextlib.asynccontextmanager
    async def _new_session(
        self, bind: AsyncEngine, router: _Router | None, options: Mapping[str, Any]
    ) -> AsyncIterator[AsyncSession]:
        kwargs = {**self._session_options, **options}
        info = dict(kwargs.pop("info", None) or {})
        if router is not None:
            info[_ROUTER] = router
        session = AsyncSession(bind=bind, sync_session_class=RoutingSession, info=info, **kwargs)
        async with session:
            yield session

    @contextlib.asynccontextmanager
    async def request_scope(self) -> AsyncIterator[None]:
        """Delimit a request: after a write in it, all its reads stay on the primary.

        Tasks started inside share the scope. Nested scopes are the outer one.
        """
        if _scope.get() is not None:
            yield
            return
        token = _scope.set(set())
        try:
            yield
        finally:
            _scope.reset(token)

    def note_write(self) -> None:
        """Record a write made outside this group's sessions (raw connection, another tool)."""
        scope = _scope.get()
        if scope is not None:
            scope.add(self._key)
        others = tuple(item for item in _last_write.get() if item[0] != self._key)
        _last_write.set((*others, (self._key, time.monotonic())))

    def _sticky(self) -> bool:
        scope = _scope.get()
        if scope is not None and self._key in scope:
            return True
        for key, wrote_at in _last_write.get():
            if key == self._key:
                return time.monotonic() - wrote_at < self.sticky_window
        return False

    # ---------------------------------------------------------------- replicas

    async def _replica_connection(self) -> AsyncConnection | None:
        """A checked-out connection on the next healthy replica, or None if none answers."""
        count = len(self._replicas)
        start = self._next_replica
        self._next_replica = (start + 1) % count
        now = time.monotonic()
        for offset in range(count):
            replica = self._replicas[(start + offset) % count]
            if not replica.down_until:
                conn = await self._checkout(replica)
            elif replica.down_until > now or replica.probing:
                continue  # down; or another read is already finding out if it is back
            else:
                replica.probing = True
                try:
                    conn = await self._checkout(replica)
                finally:
                    replica.probing = False
            if conn is not None:
                return conn
        return None

    async def _checkout(self, replica: _Replica) -> AsyncConnection | None:
        try:
            conn = await self._open_connection(replica.engine)
        except PoolTimeoutError:
            return None  # busy, not down: this read goes elsewhere
        except (AsyncPoolError, asyncio.CancelledError):
            raise  # closed pool, wrong loop, cancellation: not the replica's fault
        except Exception as exc:
            self._counters.replica_failures += 1
            if replica.down_until == 0.0:
                logger.warning(
                    "engine group: replica %r did not answer (%s); reads go elsewhere, "
                    "retrying it every %g s",
                    replica.name,
                    _reason(exc),
                    self.retry_interval,
                )
            replica.down_until = time.monotonic() + self.retry_interval
            return None
        if replica.down_until != 0.0:
            logger.warning("engine group: replica %r answers again", replica.name)
            replica.down_until = 0.0
        return conn

    @staticmethod
    async def _open_connection(engine: AsyncEngine) -> AsyncConnection:
        """Check out a connection whose socket is still open.

        The pool does not ping a connection returned less than
        ``pre_ping_skip_window`` ago; if the server closed it since (a stopped
        replica terminates its backends), the driver already knows: such
        connections are replaced here without a round trip.
        """
        attempts = pool_of(engine).state.config.max_size + 1
        for _ in range(attempts):
            conn = await engine.connect()
            raw = await conn.get_raw_connection()
            if not _driver_closed(raw.driver_connection):
                return conn
            await conn.invalidate()
            await conn.close()
        return await engine.connect()

    # -------------------------------------------------------------- read-outs

    def statistics(self) -> RoutingStatistics:
        """A frozen snapshot of the routing counters."""
        now = time.monotonic()
        counters = self._counters
        return RoutingStatistics(
            replica_reads=counters.replica_reads,
            sticky_reads=counters.sticky_reads,
            replica_fallbacks=counters.replica_fallbacks,
            replica_failures=counters.replica_failures,
            moved_to_primary=counters.moved_to_primary,
            replicas_down=tuple(r.name for r in self._replicas if r.down_until > now),
        )

    async def dispose(self) -> None:
        """Dispose every engine (``pool_lifespan`` does this, with draining)."""
        for engine in self.engines:
            await engine.dispose()


class _Router:
    """Per session: where its statements go, and whether it wrote."""

    __slots__ = ("group", "read_bind", "wrote")

    def __init__(self, group: EngineGroup, read_bind: Connection | None) -> None:
        self.group = group
        self.read_bind = read_bind  # None: a write session, or reads on the primary
        self.wrote = False

    def bind_for(self, mapper: Any, clause: Any) -> Engine | Connection:
        primary = self.group.primary.sync_engine
        flushing = clause is None and mapper is not None  # a flush asks with the mapper only
        if self.read_bind is None or self.wrote:
            # On the primary already: only note a write (a SELECT is not one, so
            # it need not be compiled to look for FOR UPDATE).
            if not self.wrote and (flushing or _writes(clause, primary.dialect)):
                self._wrote()
            return primary
        if flushing or statement_needs_primary(clause, primary.dialect):
            self.group._counters.moved_to_primary += 1
            self._wrote()
            return primary
        return self.read_bind

    def _wrote(self) -> None:
        self.wrote = True
        self.group.note_write()


class RoutingSession(Session):
    """The sync ``Session`` behind a group's ``AsyncSession``: routes each statement."""

    def get_bind(
        self,
        mapper: Any = None,
        *,
        clause: Any = None,
        bind: Any = None,
        _sa_skip_events: bool | None = None,
        _sa_skip_for_implicit_returning: bool = False,
        **kw: Any,
    ) -> Engine | Connection:
        router = self.info.get(_ROUTER)
        if bind is not None or not isinstance(router, _Router):
            return super().get_bind(
                mapper,
                clause=clause,
                bind=bind,
                _sa_skip_events=_sa_skip_events,
                _sa_skip_for_implicit_returning=_sa_skip_for_implicit_returning,
                **kw,
            )
        return router.bind_for(mapper, clause)


def create_analytics_engine(
    url: str | URL,
    config: PoolConfig | None = None,
    *,
    engine_options: Mapping[str, Any] | None = None,
) -> AsyncEngine:
    """An ``AsyncEngine`` on ``NullPool``: a fresh connection per use, closed after it.

    For long, rare analytics queries that should not hold pooled connections.
    Connect arguments are those of ``create_pooled_engine`` (``connect_timeout``,
    ``command_timeout``, ``application_name``, ``pooler``); the pool settings
    do not apply. Bound the concurrency with ``EngineGroup(analytics_limit=...)``.
    """
    config = config if config is not None else PoolConfig()
    if not isinstance(config, PoolConfig):
        raise ConfigurationError("config", type(config).__name__, "a PoolConfig or None")
    options = dict(engine_options or {})
    parsed, url_options = parse_url(url)
    config = with_url_settings(config, url_options)
    name = config.name or next_pool_name()
    connect_args = connect_args_for(
        config, name, options.pop("connect_args", {}), parsed, url_options
    )
    engine = create_async_engine(
        parsed,
        poolclass=NullPool,
        pool_logging_name=name,
        connect_args=connect_args,
        **options,
    )
    _unpooled_configs[engine.sync_engine] = config.replace(name=name)
    return engine


def application_name_of(engine: AsyncEngine) -> str:
    """The ``application_name`` the engine's connections report (the pool name unless set)."""
    if isinstance(engine.sync_engine.pool, NullPool):
        unpooled = _unpooled_configs.get(engine.sync_engine)
        if unpooled is not None:
            return unpooled.application_name or unpooled.name or _engine_name(engine)
        return _engine_name(engine)
    pool = pool_of(engine)
    return pool.state.config.application_name or pool.name


def _engine_name(engine: AsyncEngine) -> str:
    pool = engine.sync_engine.pool
    name = getattr(pool, "name", None) or getattr(pool, "logging_name", None)
    return str(name) if name else redact_url(engine.url)


def _writes(statement: Any, dialect: Any) -> bool:
    """Whether a statement run on the primary writes (marks read-your-writes)."""
    if isinstance(statement, SelectBase) or statement is None:
        return False
    return statement_needs_primary(statement, dialect)


def _reason(exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def _driver_closed(driver: Any) -> bool:
    is_closed = getattr(driver, "is_closed", None)
    return bool(is_closed()) if callable(is_closed) else False


#: ``EngineGroup`` keyword options that ``EngineGroup.create`` passes through.
_GROUP_OPTIONS: Final = ("sticky_window", "retry_interval", "analytics_limit", "session_options")


def _check_group_options(options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(_GROUP_OPTIONS))
    if unknown:
        raise ConfigurationError(
            unknown[0], options[unknown[0]], f"one of the options {', '.join(_GROUP_OPTIONS)}"
        )
    if "sticky_window" in options:
        check_seconds("sticky_window", options["sticky_window"], allow_zero=True)
    if "retry_interval" in options:
        check_seconds("retry_interval", options["retry_interval"], allow_zero=False)
    if "analytics_limit" in options:
        check_int("analytics_limit", options["analytics_limit"], low=1)
    check_mapping("session_options", options.get("session_options"))


def _check_url(setting: str, url: object) -> None:
    """The URL as ``create_pooled_engine`` would check it, the error naming ``setting``."""
    try:
        parse_url(url)  # type: ignore[arg-type]
    except ConfigurationError as exc:
        raise ConfigurationError(setting, exc.value, exc.expected) from None


def _is_engine(value: object) -> bool:
    return isinstance(value, AsyncEngine)


def _is_url(value: object) -> bool:
    return isinstance(value, str | URL)
