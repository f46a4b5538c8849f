"""TLS for real: a server with its own CA, and the sslmode a libpq URL asks for.

``tls_server`` (tests/fix_tls.py) makes a CA and a server certificate for
``localhost`` and starts a TLS-only PostgreSQL; the shared test database has
no TLS, which is what ``require`` must refuse and ``prefer`` must accept.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from asyncpool import create_pooled_engine
from tests.fix_db import CONNECT_ERROR, DRIVER, TestDatabase
from tests.fix_tls import TlsServer

_SSL_OF_THIS_BACKEND = text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")


async def _ssl_in_use(url: str) -> bool:
    engine = create_pooled_engine(url, pool_size=1, max_overflow=0, connect_timeout=5)
    try:
        async with engine.connect() as conn:
            return bool(await conn.scalar(_SSL_OF_THIS_BACKEND))
    finally:
        await engine.dispose()


async def test_verify_full_with_the_servers_ca_connects_over_tls(tls_server: TlsServer) -> None:
    url = tls_server.url(query=f"?sslmode=verify-full&sslrootcert={tls_server.ca_file}")
    assert await _ssl_in_use(url) is True


async def test_verify_full_with_the_wrong_ca_is_refused(tls_server: TlsServer) -> None:
    url = tls_server.url(query=f"?sslmode=verify-full&sslrootcert={tls_server.other_ca_file}")
    with pytest.raises(CONNECT_ERROR, match="certificate verify failed"):
        await _ssl_in_use(url)


async def test_verify_full_with_the_wrong_host_name_is_refused(tls_server: TlsServer) -> None:
    # The certificate names localhost, not 127.0.0.1.
    query = f"?sslmode=verify-full&sslrootcert={tls_server.ca_file}"
    refusal = {
        "asyncpg": "certificate verify failed: IP address mismatch",
        "psycopg": r'server certificate for "localhost".* does not match host name "127.0.0.1"',
    }
    with pytest.raises(CONNECT_ERROR, match=refusal[DRIVER]):
        await _ssl_in_use(tls_server.url("127.0.0.1", query))


async def test_verify_ca_checks_the_ca_but_not_the_host_name(tls_server: TlsServer) -> None:
    query = f"?sslmode=verify-ca&sslrootcert={tls_server.ca_file}"
    assert await _ssl_in_use(tls_server.url("127.0.0.1", query)) is True


async def test_require_against_a_server_without_tls_is_refused(database: TestDatabase) -> None:
    refusal = {
        "asyncpg": "rejected SSL upgrade",
        "psycopg": "server does not support SSL, but SSL was required",
    }
    with pytest.raises(CONNECT_ERROR, match=refusal[DRIVER]):
        await _ssl_in_use(f"{database.url}?sslmode=require")


async def test_prefer_falls_back_to_plain_and_uses_tls_where_offered(
    database: TestDatabase, tls_server: TlsServer
) -> None:
    assert await _ssl_in_use(f"{database.url}?sslmode=prefer") is False
    assert await _ssl_in_use(tls_server.url(query="?sslmode=prefer")) is True


async def test_disable_against_a_tls_only_server_is_refused_by_the_server(
    tls_server: TlsServer,
) -> None:
    with pytest.raises(Exception, match=r"no encryption|pg_hba\.conf"):
        await _ssl_in_use(tls_server.url(query="?sslmode=disable"))
