"""What the server says about its connection budget: limits, current use, CPU count.

Read-only queries any role may run; the CPU count needs the right to read a
server file (superuser or ``pg_read_server_files``) and is otherwise taken
from this machine only when the server is on it.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from sqlalchemy.engine import URL, make_url

from .._url import UrlOptions
from ..engine import parse_url

__all__ = [
    "DirectConnection",
    "ServerFacts",
    "Usage",
    "connect_direct",
    "fetch_server_facts",
    "is_local",
    "local_address",
    "read_server_facts",
]

#: Query options SQLAlchemy's asyncpg dialect consumes itself; not for asyncpg.connect().
_DIALECT_ONLY: Final = ("prepared_statement_cache_size", "prepared_statement_name_func")

_LOCAL_HOSTS: Final = frozenset({"", "localhost", "127.0.0.1", "::1"})

_USAGE_SQL: Final = """
SELECT coalesce(nullif(application_name, ''), '(none)') AS app,
       coalesce(state, 'unknown') AS state,
       count(*) AS n
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND NOT (pid = ANY($1::int[]))
GROUP BY 1, 2
ORDER BY 3 DESC, 1, 2
"""


@dataclass(frozen=True, slots=True)
class Usage:
    """Client connections of one ``application_name`` in one state."""

    application_name: str
    state: str
    count: int


@dataclass(frozen=True, slots=True)
class ServerFacts:
    version: str
    max_connections: int
    superuser_reserved: int
    #: ``reserved_connections`` (PostgreSQL 16+, for ``pg_use_reserved_connections``).
    reserved: int
    usage: tuple[Usage, ...]
    cores: int | None
    cores_source: str

    @property
    def budget(self) -> int:
        """Connections ordinary roles may open: max_connections minus the reserved slots."""
        return self.max_connections - self.superuser_reserved - self.reserved

    @property
    def in_use(self) -> int:
        """Client connections open now, not counting the ones asking."""
        return sum(u.count for u in self.usage)


def is_local(url: str) -> bool:
    """Whether the URL points at this machine (loopback or a Unix socket)."""
    parsed = make_url(url)
    host = parsed.host or ""
    socket_dir = parsed.query.get("host")
    return host in _LOCAL_HOSTS or host.startswith("/") or bool(socket_dir)


class DirectConnection(Protocol):
    """What the commands need from a connection of their own: asyncpg's
    ``Connection`` has it; psycopg's is wrapped (``_PsycopgDirect``).
    Parameters are asyncpg's ``$1``, ``$2``, ..."""

    async def execute(self, sql: str) -> Any: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...

    async def fetch(self, sql: str, *args: Any) -> Sequence[Mapping[str, Any]]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Mapping[str, Any] | None: ...

    async def close(self, *, timeout: float) -> None: ...  # noqa: ASYNC109 (asyncpg's)


async def connect_direct(
    url: str, *, connect_timeout: float, application_name: str
) -> DirectConnection:
    """One driver connection from a SQLAlchemy-style URL, without SQLAlchemy on top.

    The URL is read by SQLAlchemy's own dialect of its driver (asyncpg or
    psycopg), so it means what it means to the app. No statement cache:
    unnamed statements work behind a transaction pooler, where named ones break.
    """
    parsed, url_options = parse_url(url)
    timeout = url_options.settings.get("connect_timeout", connect_timeout)
    name = url_options.settings.get("application_name", application_name)
    if parsed.get_driver_name() == "psycopg":
        return await _connect_psycopg(parsed, url_options, timeout, name)

    import asyncpg
    from sqlalchemy.dialects.postgresql import asyncpg as sa_asyncpg

    dialect_class: Any = sa_asyncpg.dialect
    dialect = dialect_class()
    _, params = dialect.create_connect_args(parsed)
    for key in _DIALECT_ONLY:
        params.pop(key, None)
    params.update(url_options.connect_args)
    settings = {**url_options.server_settings, **dict(params.pop("server_settings", None) or {})}
    settings.setdefault("application_name", name)
    params["timeout"] = timeout
    params["statement_cache_size"] = 0
    conn: DirectConnection = await asyncpg.connect(**params, server_settings=settings)
    return conn


async def _connect_psycopg(
    parsed: URL, url_options: UrlOptions, connect_timeout: float, name: str
) -> DirectConnection:
    import psycopg
    from psycopg.rows import dict_row
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    from .._drivers._psycopg import connect_args

    dialect_class: Any = PGDialect_psycopg
    _, params = dialect_class().create_connect_args(parsed)
    params.update(
        connect_args(
            url_options.connect_args,
            application_name=name,
            connect_timeout=connect_timeout,
            command_timeout=None,
            server_settings=url_options.server_settings,
            pgbouncer=False,
            name="asyncpool",
        )
    )
    params.pop("async_creator_fn", None)  # psycopg's own connection class is enough here
    params["prepare_threshold"] = None  # unnamed statements only
    conn = await psycopg.AsyncConnection.connect(**params, autocommit=True, row_factory=dict_row)
    return _PsycopgDirect(conn)


_PARAMETER: Final = re.compile(r"\$(\d+)")


class _PsycopgDirect:
    """A psycopg connection (autocommit, rows as dicts) answering asyncpg's calls."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @staticmethod
    def _query(sql: str, args: tuple[Any, ...]) -> tuple[str, dict[str, Any] | None]:
        if not args:
            return sql, None  # as it is (psycopg's simple protocol)
        # $1 -> %(p1)s: a parameter may repeat; a literal % is doubled.
        query = _PARAMETER.sub(r"%(p\1)s", sql.replace("%", "%%"))
        return query, {f"p{number}": value for number, value in enumerate(args, 1)}

    async def execute(self, sql: str) -> Any:
        return await self._conn.execute(sql)

    async def fetch(self, sql: str, *args: Any) -> Sequence[Mapping[str, Any]]:
        cursor = await self._conn.execute(*self._query(sql, args))
        rows: list[Mapping[str, Any]] = await cursor.fetchall()
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> Mapping[str, Any] | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return next(iter(row.values())) if row else None

    def sockname(self) -> Any:
        fd = self._conn.pgconn.socket
        sock = socket.socket(fileno=fd)
        try:
            return sock.getsockname()
        finally:
            sock.detach()

    async def close(self, *, timeout: float) -> None:  # noqa: ASYNC109 (asyncpg's)
        async with asyncio.timeout(timeout):
            await self._conn.close()


def local_address(conn: DirectConnection) -> tuple[str, int] | None:
    """This end's address of a TCP connection; None over a Unix socket."""
    if isinstance(conn, _PsycopgDirect):
        name = conn.sockname()
    else:
        transport = getattr(conn, "_transport", None)
        name = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return None


async def fetch_server_facts(
    url: str, *, connect_timeout: float, application_name: str
) -> ServerFacts:
    """Connect once, read the facts, disconnect."""
    driver = await connect_direct(
        url, connect_timeout=connect_timeout, application_name=application_name
    )
    try:
        pid = int(await driver.fetchval("SELECT pg_backend_pid()"))
        return await read_server_facts(driver, local=is_local(url), own_pids=[pid])
    finally:
        await driver.close(timeout=connect_timeout)


async def read_server_facts(
    driver: DirectConnection, *, local: bool, own_pids: list[int]
) -> ServerFacts:
    """Read the facts through a direct connection (outside any transaction)."""
    version = await driver.fetchval("SHOW server_version")
    max_connections = int(await driver.fetchval("SHOW max_connections"))
    superuser_reserved = int(await driver.fetchval("SHOW superuser_reserved_connections"))
    reserved_text = await driver.fetchval("SELECT current_setting('reserved_connections', true)")
    rows = await driver.fetch(_USAGE_SQL, own_pids)
    cores, source = await _cores(driver, local=local)
    return ServerFacts(
        version=str(version),
        max_connections=max_connections,
        superuser_reserved=superuser_reserved,
        reserved=int(reserved_text) if reserved_text else 0,
        usage=tuple(Usage(r["app"], r["state"], int(r["n"])) for r in rows),
        cores=cores,
        cores_source=source,
    )


async def _cores(driver: DirectConnection, *, local: bool) -> tuple[int | None, str]:
    try:
        cpuinfo = await driver.fetchval("SELECT pg_read_file('/proc/cpuinfo')")
    except Exception:  # no right to read server files, or not Linux
        cpuinfo = None
    if cpuinfo:
        count = sum(1 for line in str(cpuinfo).splitlines() if line.startswith("processor"))
        quota = await _cgroup_quota(driver)
        if count and quota is not None and quota < count:
            return quota, "the server's cgroup CPU quota"
        if count:
            return count, "the server's /proc/cpuinfo"
    if local:
        return os.cpu_count(), "this machine (the server is local)"
    return None, "unknown: no right to read it from the server; give --server-cores"


async def _cgroup_quota(driver: DirectConnection) -> int | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` quota (containers), if any."""
    try:
        text = await driver.fetchval("SELECT pg_read_file('/sys/fs/cgroup/cpu.max')")
    except Exception:
        return None
    parts = str(text or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        return max(math.ceil(int(parts[0]) / int(parts[1])), 1)
    except (ValueError, ZeroDivisionError):
        return None
