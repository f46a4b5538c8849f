"""psycopg before libpq 17: the pool's cancel without ``PQcancel()``.

libpq < 17 cancels only with the blocking ``PQcancel()``, which psycopg's C
implementation runs holding the GIL (a black-holed network froze the whole
process). The pool sends ``pg_cancel_backend()`` on a connection of its own
instead, and only to the backend it can tell apart for sure: the pid *and*
the client port the server sees. The function is the same on every libpq,
so these run on the newest wheel too; .ci/versions runs the suite on libpq 16.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from asyncpool._drivers._psycopg import _cancel_from_another_connection, connection_class
from tests.fix_db import TestDatabase, wait_for_async
from tests.fix_proxy import FaultProxy, proxied_url


def _libpq_dsn(url: str, app_name: str) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.update_query_dict({"application_name": app_name}).render_as_string(
        hide_password=False
    )


async def _sleeping_connection(dsn: str) -> tuple[Any, asyncio.Task[Any]]:
    conn = await connection_class().connect(dsn, autocommit=True)
    return conn, asyncio.ensure_future(conn.execute("SELECT pg_sleep(5)"))


async def _pools_cancel(conn: Any) -> None:
    await _cancel_from_another_connection(conn)


async def _psycopgs_cancel_safe(conn: Any) -> None:
    # psycopg calls it itself (a stream or COPY cut short); on libpq < 17 the
    # pool's connection class sends the cancel as the pool does.
    await conn.cancel_safe(timeout=2)


@pytest.mark.parametrize("cancel", [_pools_cancel, _psycopgs_cancel_safe])
async def test_it_cancels_the_statement_of_its_own_backend_and_the_connection_stays_usable(
    database: TestDatabase, app_name: str, cancel: Callable[[Any], Awaitable[None]]
) -> None:
    conn, statement = await _sleeping_connection(_libpq_dsn(database.url, app_name))
    try:
        await wait_for_async(lambda: database.any_sleeping(app_name), what="pg_sleep")
        async with asyncio.timeout(2):
            await cancel(conn)
            with pytest.raises(psycopg.errors.QueryCanceled):
                await statement
        assert await database.sleeping(app_name) == 0
        cursor = await conn.execute("SELECT 1")
        assert await cursor.fetchone() == (1,)
    finally:
        await conn.close()

    async def cancel_connection_gone() -> bool:
        return not await database.backends(f"{app_name} (cancel)")

    await wait_for_async(cancel_connection_gone, what="the cancel's own connection to end")


async def test_a_backend_it_cannot_tell_apart_is_left_alone_and_it_says_so(
    database: TestDatabase, fault_proxy: FaultProxy, app_name: str
) -> None:
    # Through a proxy (as behind a NAT, a load balancer or a pooler) the
    # server sees another client port: the pid alone could be anybody's.
    conn, statement = await _sleeping_connection(
        _libpq_dsn(proxied_url(database, fault_proxy), app_name)
    )
    try:
        await wait_for_async(lambda: database.any_sleeping(app_name), what="pg_sleep")
        with pytest.raises(ConnectionError, match="could not be identified"):
            await _cancel_from_another_connection(conn)
        assert await database.sleeping(app_name) == 1  # nothing cancelled
    finally:
        statement.cancel()
        conn.pgconn.finish()  # abort: the pool closes such a connection
        await asyncio.gather(statement, return_exceptions=True)
        await database.fetch(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            app_name,
        )
