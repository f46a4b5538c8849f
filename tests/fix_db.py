"""The test database: ``ASYNCPOOL_TEST_DSN`` when set, else an embedded PostgreSQL.

``ASYNCPOOL_TEST_DRIVER=psycopg`` puts ``database.url`` (what the tests'
engines use) on psycopg 3; the admin helpers stay on asyncpg. Tests of
asyncpg-only behaviour carry ``@pytest.mark.asyncpg_only`` and the psycopg
pass deselects them (``-m "not asyncpg_only"``).

Loaded as a pytest plugin (``-p tests.fix_db``). The embedded server is
started once per test session and removed at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import sqlalchemy.exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncpool
from asyncpool.embedded import EmbeddedPostgres

#: The driver the tests' engines use: asyncpg (default) or psycopg.
DRIVER = os.environ.get("ASYNCPOOL_TEST_DRIVER", "asyncpg")
if DRIVER not in ("asyncpg", "psycopg"):
    raise RuntimeError(f"ASYNCPOOL_TEST_DRIVER={DRIVER!r}: asyncpg or psycopg")

#: What a failed connect raises through the engine: asyncpg's errors are
#: ``OSError`` subclasses and escape unwrapped; psycopg's ``OperationalError``
#: comes wrapped in SQLAlchemy's.
CONNECT_ERROR: type[Exception] = OSError if DRIVER == "asyncpg" else sqlalchemy.exc.OperationalError

#: ``error.type`` of a connect to a port nobody listens on.
REFUSED_ERROR_TYPES: frozenset[str] = (
    frozenset({"ConnectionRefusedError", "OSError"})
    if DRIVER == "asyncpg"
    else frozenset({"psycopg.OperationalError"})
)


class TestDatabase:
    """A reachable PostgreSQL and a few admin helpers that use their own connections."""

    __test__ = False

    def __init__(self, dsn: str, server: EmbeddedPostgres | None) -> None:
        url = make_url(dsn)
        self.dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.driver = DRIVER
        self.url = url.set(drivername=f"postgresql+{DRIVER}").render_as_string(hide_password=False)
        self.server = server

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def backends(self, application_name: str) -> list[asyncpg.Record]:
        """Server backends opened under ``application_name``."""
        return await self.fetch(
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = $1",
            application_name,
        )

    async def sleeping(self, application_name: str) -> int:
        """Backends of ``application_name`` running a ``pg_sleep`` statement now."""
        count = await self.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND state = 'active' AND query LIKE '%pg_sleep(%'",
            application_name,
        )
        return int(count)

    async def any_sleeping(self, application_name: str) -> bool:
        return await self.sleeping(application_name) > 0

    async def assert_clean(self, application_name: str, bound: int) -> None:
        """Nothing running, nothing open in a transaction, no lock held, no
        more backends than the pool's ``bound``."""
        rows = await self.fetch(
            "SELECT a.state, (SELECT count(*) FROM pg_locks l WHERE l.pid = a.pid"
            " AND l.locktype <> 'virtualxid') AS locks"
            " FROM pg_stat_activity a WHERE a.application_name = $1",
            application_name,
        )
        assert len(rows) <= bound
        assert [(r["state"], r["locks"]) for r in rows] == [("idle", 0)] * len(rows)

    async def terminate(self, application_name: str) -> int:
        """``pg_terminate_backend`` every backend of ``application_name``; wait until gone."""
        pids = [r["pid"] for r in await self.backends(application_name)]
        for pid in pids:
            await self.fetchval("SELECT pg_terminate_backend($1)", pid)
        await wait_for_async(
            lambda: self._none_left(pids), what=f"backends {pids} to exit", within=10
        )
        return len(pids)

    async def _none_left(self, pids: list[int]) -> bool:
        left = await self.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids
        )
        return bool(left == 0)


async def wait_for_async(
    predicate: Callable[[], Awaitable[bool]], *, what: str, within: float = 5.0
) -> None:
    """Poll an async predicate until true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_until(predicate: Callable[[], bool], *, what: str, within: float = 5.0) -> None:
    """Poll a plain predicate until true (yielding to the loop), bounded."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture(scope="session")
def database() -> Iterator[TestDatabase]:
    dsn = os.environ.get("ASYNCPOOL_TEST_DSN")
    if dsn:
        yield TestDatabase(dsn, server=None)
        return
    with EmbeddedPostgres() as server:
        yield TestDatabase(server.dsn("postgres"), server=server)


@pytest.fixture
def app_name(request: pytest.FixtureRequest) -> str:
    """An application_name unique to the test, to find its backends."""
    # The driver is part of it: a psycopg pass may run beside an asyncpg one.
    key = request.node.nodeid if DRIVER == "asyncpg" else f"{request.node.nodeid}@{DRIVER}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return f"ap-{digest}"


EngineFactory = Callable[..., AsyncEngine]
SyncEngineFactory = Callable[..., AsyncEngine]


@pytest.fixture
def make_sync_engine(database: TestDatabase, app_name: str) -> Iterator[SyncEngineFactory]:
    """Engines for sync tests (``asyncpool.run``); the main thread's kept loop
    is closed afterwards."""

    def factory(**overrides: Any) -> AsyncEngine:
        overrides.setdefault("application_name", app_name)
        overrides.setdefault("name", app_name)
        return asyncpool.create_pooled_engine(database.url, **overrides)

    yield factory
    asyncpool.runner.close()


@pytest.fixture
async def make_engine(database: TestDatabase, app_name: str) -> AsyncIterator[EngineFactory]:
    """Create pooled engines on the test database; disposed after the test."""
    engines: list[AsyncEngine] = []

    def factory(url: str | None = None, **overrides: Any) -> AsyncEngine:
        overrides.setdefault("application_name", app_name)
        overrides.setdefault("name", app_name)
        engine = asyncpool.create_pooled_engine(url or database.url, **overrides)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.dispose()
