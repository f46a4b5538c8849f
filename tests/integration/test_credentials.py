"""Rotating credentials (issue 15): a password asked for at every new connection.

A role whose password changes every second on a server that checks it
(scram-sha-256), and a callable that returns the current one: every
checkout succeeds, and the passwords appear in no log, error or statistic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url

from asyncpool import ConfigurationError, create_pooled_engine, statistics
from asyncpool.embedded import EmbeddedPostgres
from tests.fix_db import EngineFactory, TestDatabase

_HBA = """\
local  all  all                    trust
host   all  postgres  127.0.0.1/32  trust
host   all  all       127.0.0.1/32  scram-sha-256
"""


@pytest.fixture(scope="module")
def scram_server() -> Iterator[TestDatabase]:
    """A PostgreSQL of the module's own that checks passwords (scram-sha-256)."""
    with EmbeddedPostgres(settings={"password_encryption": "'scram-sha-256'"}) as server:
        (server.data_dir / "pg_hba.conf").write_text(_HBA)
        server.reload()
        yield TestDatabase(server.dsn("postgres"), server=server)


def role_url(database: TestDatabase, role: str) -> str:
    return make_url(database.url).set(username=role, password=None).render_as_string()


async def test_a_password_changed_every_second_never_fails_a_checkout(
    make_engine: EngineFactory,
    scram_server: TestDatabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = scram_server
    await admin.fetch("DROP ROLE IF EXISTS rotating")
    await admin.fetch("CREATE ROLE rotating LOGIN PASSWORD 'rotating-secret-0'")
    caplog.set_level(logging.DEBUG)
    current = "rotating-secret-0"
    used: list[str] = []
    # A rotation waits for the connects that already have the old password,
    # and new ones wait for the rotation: the provider is always right.
    rotation = asyncio.Lock()
    connecting = 0
    settled = asyncio.Event()
    settled.set()

    async def password() -> str:
        nonlocal connecting
        async with rotation:
            connecting += 1
            settled.clear()
            used.append(current)
            return current

    def connected(*_: object) -> None:
        nonlocal connecting
        connecting -= 1
        if connecting == 0:
            settled.set()

    engine = make_engine(
        role_url(admin, "rotating"), password=password, pool_size=2, max_overflow=0, pool_recycle=1
    )
    event.listen(engine.sync_engine, "connect", connected)

    async def rotate() -> None:
        nonlocal current
        for n in range(1, 100):
            await asyncio.sleep(1.0)  # the rotation schedule, not a synchronisation
            async with rotation:
                await settled.wait()
                current = f"rotating-secret-{n}"
                await admin.fetch(f"ALTER ROLE rotating PASSWORD '{current}'")

    async def checkout() -> int:
        async with engine.connect() as conn:
            value = int((await conn.execute(text("SELECT 1"))).scalar_one())
        await asyncio.sleep(0.02)
        return value

    rotator = asyncio.create_task(rotate())
    try:
        results = [await checkout() for _ in range(200)]
    finally:
        rotator.cancel()
        await asyncio.gather(rotator, return_exceptions=True)

    assert results == [1] * 200
    stats = statistics(engine)
    assert stats.connect_errors == 0
    # Every connect asked for the password (a background recycle may be
    # connecting right now: asked, not counted yet); new ones were used.
    assert stats.connects <= len(used) <= stats.connects + 2
    assert len(set(used)) >= 3
    shown = "\n".join(
        [caplog.text, repr(stats), str(engine.url), repr(engine.url), repr(engine.pool)]
    )
    assert not [p for p in set(used) if p in shown]


async def test_a_sync_callable_is_asked_for_every_new_connection(
    make_engine: EngineFactory, database: TestDatabase
) -> None:
    calls = 0

    def password() -> str:
        nonlocal calls
        calls += 1
        return "not-checked-here"

    url = make_url(database.url).set(password=None).render_as_string()
    engine = make_engine(url, password=password, pool_size=2, max_overflow=0)
    held = [await engine.connect() for _ in range(2)]
    for conn in held:
        await conn.execute(text("SELECT 1"))
        await conn.invalidate()  # the next checkout reconnects
        await conn.close()
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    assert calls == statistics(engine).connects == 3


def test_bad_passwords_are_refused_before_any_connection_without_showing_them(
    database: TestDatabase,
) -> None:
    url = make_url(database.url).set(password=None).render_as_string()
    with pytest.raises(ConfigurationError, match="password must be a string") as caught:
        create_pooled_engine(url, password=b"hunter2-bytes")  # type: ignore[arg-type]
    assert "hunter2" not in str(caught.value)
    with_password = make_url(database.url).set(password="in-the-url").render_as_string()
    with pytest.raises(ConfigurationError, match="the URL has a password too") as caught:
        create_pooled_engine(with_password, password="hunter2")
    assert "hunter2" not in str(caught.value) and "in-the-url" not in str(caught.value)
    with pytest.raises(ConfigurationError, match="password_lifetime"):
        create_pooled_engine(url, password="x", password_lifetime=0)


def test_a_declared_lifetime_keeps_pool_recycle_below_it(database: TestDatabase) -> None:
    from asyncpool.engine import pool_of

    url = make_url(database.url).set(password=None).render_as_string()
    engine = create_pooled_engine(url, password=lambda: "t", password_lifetime=900)
    assert pool_of(engine).state.config.pool_recycle == 900
    engine = create_pooled_engine(url, password="t", password_lifetime=900, pool_recycle=60)
    assert pool_of(engine).state.config.pool_recycle == 60


async def test_a_callable_returning_something_else_fails_the_connect_clearly(
    make_engine: EngineFactory, database: TestDatabase
) -> None:
    url = make_url(database.url).set(password=None).render_as_string()
    engine = make_engine(url, password=lambda: 12345)
    with pytest.raises(ConfigurationError, match="a callable returning a string") as caught:
        async with engine.connect():
            pass
    assert "12345" not in str(caught.value)
    assert statistics(engine).checked_out == 0
