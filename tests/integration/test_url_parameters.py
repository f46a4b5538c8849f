"""libpq URL parameters, as cloud consoles hand them out, work against a real server."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from asyncpool import create_pooled_engine
from tests.fix_db import DRIVER, TestDatabase
from tests.fix_lifespan import PASSWORD, PASSWORD_USER, PasswordServer


async def test_libpq_parameters_from_a_cloud_console_connect_and_take_effect(
    database: TestDatabase, app_name: str
) -> None:
    options = quote("-c statement_timeout=4321")
    # asyncpg's statement cache can be turned off in the URL too (PgBouncer
    # guides say so); psycopg refuses the name (it is not libpq's).
    cache = "&statement_cache_size=0" if database.driver == "asyncpg" else ""
    url = (
        f"{database.url}?sslmode=prefer&connect_timeout=5&application_name={app_name}"
        f"&options={options}{cache}&target_session_attrs=any"
    )
    engine = create_pooled_engine(url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT current_setting('application_name'), "
                        "current_setting('statement_timeout')"
                    )
                )
            ).one()
            # A type that needs introspection (with asyncpg's statement cache off).
            await conn.execute(text("SELECT 1::int2, now()"))
    finally:
        await engine.dispose()
    assert tuple(row) == (app_name, "4321ms")


async def test_a_password_given_as_a_query_parameter_authenticates(
    password_database: PasswordServer,
) -> None:
    url = (
        f"postgresql+{DRIVER}://{PASSWORD_USER}@{password_database.host}:"
        f"{password_database.port}/postgres?password={PASSWORD}"
    )
    engine = create_pooled_engine(url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT current_user")) == PASSWORD_USER
        assert PASSWORD not in repr(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port whose listener completes the TCP handshake and then never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.asyncpg_only  # psycopg: psycopg's connect_timeout is whole seconds, at least 2
@pytest.mark.parametrize("parameter", ["timeout", "connect_timeout"])
async def test_a_connect_timeout_in_the_url_bounds_a_connect_to_a_silent_server(
    database: TestDatabase, silent_server: int, parameter: str
) -> None:
    url = make_url(database.url).set(host="127.0.0.1", port=silent_server)
    engine = create_pooled_engine(
        f"{url.render_as_string(hide_password=False)}?{parameter}=1", pool_timeout=30
    )
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            await engine.connect()
    finally:
        await engine.dispose()
    assert time.monotonic() - started < 5  # PoolConfig's default would wait 10 s


async def test_host_and_port_as_query_parameters_reach_the_server(
    database: TestDatabase, app_name: str
) -> None:
    # libpq's form for a Unix socket or several hosts: the benchmark's URL
    # (``postgresql://user@/db?host=/run/postgresql&port=5432``) was refused.
    url = make_url(database.url)
    query_form = (
        f"postgresql+{DRIVER}://{url.username}@/{url.database}"
        f"?host={url.host or '127.0.0.1'}&port={url.port or 5432}"
    )
    engine = create_pooled_engine(query_form, application_name=app_name, pool_size=1)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()
