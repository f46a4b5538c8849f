"""Fixtures for the lifespan tests: a PostgreSQL that really checks passwords.

The machine's PostgreSQL and the shared embedded one trust every local user,
so a wrong password would be accepted there. ``password_database`` starts its
own embedded server whose pg_hba.conf requires scram-sha-256 over TCP for
everybody but ``postgres``, with one role that has a password.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from asyncpool.embedded import EmbeddedPostgres

#: The role created on the password-checking server, and its real password.
PASSWORD_USER = "pw_app"
PASSWORD = "right-pass-7f3c"

_HBA = """\
local   all   all                    trust
host    all   postgres  127.0.0.1/32 trust
host    all   all       127.0.0.1/32 scram-sha-256
"""


@dataclass(frozen=True)
class PasswordServer:
    """Where the password-checking server listens."""

    host: str
    port: int

    def url(self, password: str) -> str:
        return f"postgresql+asyncpg://{PASSWORD_USER}:{password}@{self.host}:{self.port}/postgres"


async def _create_role(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        await conn.execute(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def password_database() -> Iterator[PasswordServer]:
    server = EmbeddedPostgres()
    try:
        server.init()
        (server.data_dir / "pg_hba.conf").write_text(_HBA)
        server.start()
        asyncio.run(_create_role(server.dsn()))
        yield PasswordServer(server.host, server.port)
    finally:
        server.cleanup()
