"""create_pooled_engine(): an AsyncEngine with asyncpool's pool and defaults.

The result is a genuine ``sqlalchemy.ext.asyncio.AsyncEngine``, so sessions,
``async_sessionmaker`` and all SQLAlchemy code work unchanged. What changes is
the pool underneath (fair, bounded, observable) and the driver's connection
settings (timeouts, ``application_name``): asyncpg (``postgresql://``,
``postgresql+asyncpg://``) or psycopg 3 (``postgresql+psycopg://``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._concurrent import detect_concurrent_use, guard_sessions
from ._credentials import Password, check_password, install_password, recycle_within
from ._events import install_error_handling
from ._pgbouncer import pgbouncer_connect_args
from ._pool import FairAsyncPool, PerLoopPool, PoolState, next_pool_name
from ._url import UrlOptions, merge_settings, redact_url, scrub, translate_query
from .config import PoolConfig, setting_names
from .errors import AsyncPoolError, ConfigurationError

__all__ = ["create_pooled_engine", "parse_url", "pool_of", "redact_url"]

#: Driver names accepted as they are, and the ones upgraded to asyncpg.
_ASYNCPG: Final = "postgresql+asyncpg"
_PSYCOPG: Final = "postgresql+psycopg"
_PLAIN_POSTGRES: Final = frozenset({"postgresql", "postgres"})
#: Other spellings of the two drivers.
_ALIASES: Final = {
    "postgres+asyncpg": _ASYNCPG,
    "postgres+psycopg": _PSYCOPG,
    "postgresql+psycopg_async": _PSYCOPG,
}

#: create_async_engine options that asyncpool owns; setting them would undo it.
_RESERVED_ENGINE_OPTIONS: Final = frozenset(
    {
        "poolclass",
        "pool",
        "pool_size",
        "max_overflow",
        "pool_timeout",
        "pool_recycle",
        "pool_pre_ping",
        "pool_use_lifo",
        "pool_logging_name",
        "asyncpool_state",
    }
)


def create_pooled_engine(
    url: str | URL,
    config: PoolConfig | None = None,
    *,
    engine_options: Mapping[str, Any] | None = None,
    telemetry: bool = True,
    password: Password | None = None,
    password_lifetime: float | None = None,
    **overrides: Any,
) -> AsyncEngine:
    """Create an ``AsyncEngine`` on asyncpool's fair pool.

    ``config`` gives the pool settings (defaults: ``PoolConfig()``);
    ``overrides`` change single settings (``pool_size=20``).
    ``engine_options`` are passed to ``create_async_engine`` as they are
    (``echo``, ``json_serializer``, ``connect_args``, ...), except the pool
    options asyncpool sets itself.
    ``telemetry=False`` skips OpenTelemetry instrumentation (on by default,
    with the global providers; see ``asyncpool.telemetry``).
    ``password``: a string, or a sync or async callable returning the
    password, called for every new connection (rotating credentials: RDS IAM,
    Entra ID, Vault); ``password_lifetime`` (seconds) keeps ``pool_recycle``
    at or below it. The URL must not carry a password then.

    Raises ``ConfigurationError`` before any connection is opened when a
    setting is invalid or the URL is not PostgreSQL on asyncpg or psycopg.
    """
    config = config if config is not None else PoolConfig()
    if not isinstance(config, PoolConfig):
        raise ConfigurationError("config", type(config).__name__, "a PoolConfig or None")
    if overrides:
        config = config.replace(**overrides)
    options = dict(engine_options or {})
    reserved = sorted(_RESERVED_ENGINE_OPTIONS & set(options))
    if reserved:
        raise ConfigurationError(
            f"engine_options[{reserved[0]!r}]",
            options[reserved[0]],
            f"left to asyncpool; set it through PoolConfig ({', '.join(setting_names())})",
        )
    parsed, url_options = parse_url(url)
    config = with_url_settings(config, url_options)
    if password is not None or password_lifetime is not None:
        check_password(password, parsed, password_lifetime)
        config = recycle_within(config, password_lifetime)
    name = config.name or next_pool_name()
    config = config.replace(name=name)
    state = PoolState(config, name)

    connect_args = connect_args_for(
        config, name, options.pop("connect_args", {}), parsed, url_options
    )

    engine = create_async_engine(
        parsed,
        poolclass=PerLoopPool if config.pool_per_loop else FairAsyncPool,
        asyncpool_state=state,
        pool_size=config.pool_size,
        max_overflow=config.max_overflow,
        pool_timeout=config.pool_timeout,
        pool_recycle=-1 if config.pool_recycle is None else config.pool_recycle,
        pool_use_lifo=config.use_lifo,
        pool_pre_ping=False,  # asyncpool pings itself, bounded and cheaper
        pool_logging_name=name,
        connect_args=connect_args,
        **options,
    )
    install_error_handling(engine)
    if password is not None:
        install_password(engine, password)
    if detect_concurrent_use(config):
        guard_sessions()
    for hook in _engine_hooks:
        if telemetry or not getattr(hook, "is_telemetry", False):
            hook(engine)
    return engine


#: Called with every new engine (telemetry, fork safety register here); a
#: hook with a true ``is_telemetry`` attribute is skipped for ``telemetry=False``.
_engine_hooks: list[Any] = []


def with_url_settings(config: PoolConfig, url_options: UrlOptions) -> PoolConfig:
    """``config`` with the settings the URL gave (``connect_timeout``, ...).

    A setting given both in the URL and explicitly, differently, is an error.
    """
    if not url_options.settings:
        return config
    defaults = {f.name: f.default for f in dataclasses.fields(PoolConfig)}
    configured = {name: getattr(config, name) for name in url_options.settings}
    changes = merge_settings(url_options.settings, configured, defaults)
    try:
        return config.replace(**changes)
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"URL parameter {exc.setting!r}", exc.value, exc.expected
        ) from None


def connect_args_for(
    config: PoolConfig,
    name: str,
    given: Mapping[str, Any],
    url: URL,
    url_options: UrlOptions | None = None,
) -> dict[str, Any]:
    """The driver's connect arguments for ``config``: timeouts, ``application_name``,
    what the URL's libpq parameters became, pooler. ``connect_args`` win over the URL."""
    from_url = url_options or UrlOptions()
    if url.drivername == _PSYCOPG:
        from ._drivers._psycopg import connect_args as psycopg_args

        return psycopg_args(
            {**from_url.connect_args, **given},
            application_name=config.application_name or name,
            connect_timeout=config.connect_timeout,
            command_timeout=config.command_timeout,
            server_settings=from_url.server_settings,
            pgbouncer=config.pooler == "pgbouncer",
            name=name,
        )
    if config.pooler == "pgbouncer":
        for key in ("statement_cache_size",):
            value = from_url.connect_args.get(key)
            if value not in (None, 0):
                raise ConfigurationError(
                    f"URL parameter {key!r} of pool {name!r} with pooler='pgbouncer'",
                    value,
                    "0 (behind PgBouncer in transaction mode a cached statement is used on "
                    "another server connection; leave it to pooler='pgbouncer')",
                )
    connect_args = {**from_url.connect_args, **given}
    server_settings = {**from_url.server_settings, **dict(connect_args.pop("server_settings", {}))}
    server_settings.setdefault("application_name", config.application_name or name)
    connect_args["server_settings"] = server_settings
    connect_args.setdefault("timeout", config.connect_timeout)
    if config.command_timeout is not None:
        connect_args.setdefault("command_timeout", config.command_timeout)
    if config.pooler == "pgbouncer":
        connect_args = pgbouncer_connect_args(connect_args, url, name)
    return connect_args


def pool_of(engine: AsyncEngine | Any) -> FairAsyncPool:
    """The asyncpool pool behind ``engine`` (an AsyncEngine or its sync_engine)."""
    sync_engine = getattr(engine, "sync_engine", engine)
    pool = getattr(sync_engine, "pool", None)
    if not isinstance(pool, FairAsyncPool):
        raise AsyncPoolError(
            f"{engine!r} does not use asyncpool's pool; create it with "
            "asyncpool.create_pooled_engine()"
        )
    return pool


def _asyncpg_url(url: str | URL) -> URL:
    """The URL, checked, on asyncpg, without the libpq parameters (see ``parse_url``)."""
    return parse_url(url)[0]


def parse_url(url: str | URL) -> tuple[URL, UrlOptions]:
    """The URL checked, on asyncpg (``postgresql://``) or psycopg, without the
    libpq parameters asyncpool translates, and what they became.
    ``ConfigurationError`` for anything the driver would refuse, with the URL
    redacted."""
    if not isinstance(url, str | URL):
        raise ConfigurationError("url", type(url).__name__, "a database URL string or URL")
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        # The raw text may hold a password: never echo it.
        raise ConfigurationError(
            "url",
            "<unparseable URL>",
            "a URL like postgresql+asyncpg://user:password@host:5432/dbname "
            f"({type(exc).__name__})",
        ) from None
    if parsed.drivername in _PLAIN_POSTGRES:
        parsed = parsed.set(drivername=_ASYNCPG)
    parsed = parsed.set(drivername=_ALIASES.get(parsed.drivername, parsed.drivername))
    if parsed.drivername not in (_ASYNCPG, _PSYCOPG):
        raise ConfigurationError(
            "url",
            redact_url(parsed),
            "a PostgreSQL URL on the asyncpg or psycopg driver "
            "(postgresql+asyncpg://... or postgresql+psycopg://...)",
        )
    driver = parsed.get_driver_name()
    try:
        port = parsed.port
    except ValueError:
        raise ConfigurationError("url", redact_url(parsed), "a URL with a numeric port") from None
    if port is not None and not 0 < port < 65536:
        raise ConfigurationError("url", redact_url(parsed), "a URL with a port from 1 to 65535")
    translated, url_options = translate_query(parsed, driver)
    try:
        # What create_async_engine does with the URL (several hosts): refuse
        # now, as a ConfigurationError, what it would refuse.
        dialect: Any = PGDialect_asyncpg if driver == "asyncpg" else PGDialect_psycopg
        dialect().create_connect_args(translated)
    except (ArgumentError, ValueError, TypeError) as exc:
        raise ConfigurationError(
            "url", redact_url(parsed), f"a URL {driver} accepts ({scrub(str(exc), [parsed])})"
        ) from None
    return translated, url_options
