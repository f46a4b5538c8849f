"""Dead connections are found and replaced; overload is refused fast; retries are bounded.

Each fault is real: backends killed with ``pg_terminate_backend``, a server
restarted with its own ``pg_ctl``, ``idle_session_timeout`` expiring, a
failover's read-only primary (``ALTER SYSTEM`` on a server of our own), and
a TCP proxy that black-holes or resets the network. Only the requests that
were mid-query at the moment of the fault fail; the next ones succeed, and
nothing waits longer than its timeouts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncpool
from asyncpool import PoolOverloadedError, PoolTimeoutError, statistics
from asyncpool._classify import classify, is_disconnect
from asyncpool.engine import pool_of
from tests.fix_db import EngineFactory, TestDatabase, wait_for_async, wait_until
from tests.fix_proxy import FaultProxy, proxied_url

#: Slack for "within its timeouts" on a shared 2-core machine.
SLACK = 0.5


async def warm(engine: AsyncEngine, count: int) -> set[int]:
    """Open ``count`` connections at once and give them back; their backend pids."""
    conns = [await engine.connect() for _ in range(count)]
    pids = {(await c.execute(text("SELECT pg_backend_pid()"))).scalar_one() for c in conns}
    for conn in conns:
        await conn.close()
    return pids


async def query(engine: AsyncEngine, sql: str = "SELECT 1") -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql))).scalar()


async def start_in_flight(
    engine: AsyncEngine, database: TestDatabase, app_name: str
) -> asyncio.Future[Any]:
    """A query that runs until the fault hits it; returns once the server runs it."""
    running = asyncio.ensure_future(query(engine, "SELECT pg_sleep(60)"))

    async def active() -> bool:
        return any(r["state"] == "active" for r in await database.backends(app_name))

    await wait_for_async(active, what="the query to run")
    return running


def reasons(engine: AsyncEngine) -> dict[str, int]:
    return dict(pool_of(engine).state.counters.invalidations_by_reason)


# ------------------------------------------------------------ dead backends


async def test_killed_backends_fail_only_the_query_in_flight_and_the_next_requests_succeed(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=4, max_overflow=0, pre_ping_skip_window=0)
    await warm(engine, 4)
    running = await start_in_flight(engine, database, app_name)
    assert await database.terminate(app_name) == 4

    with pytest.raises(sa_exc.DBAPIError) as failed:
        await running
    assert failed.value.connection_invalidated
    assert is_disconnect(failed.value)
    assert [await query(engine) for _ in range(20)] == [1] * 20
    # The three idle connections the kill ended never reached a caller: the
    # pre-ping replaced them, or the pool's maintenance did first.
    stats = statistics(engine)
    found = reasons(engine)
    assert found.pop(classify(failed.value)) == 1
    assert set(found) <= {"pre_ping", "idle_dead"} and sum(found.values()) == 3
    assert (stats.pre_ping_failures, stats.checked_out) == (found.get("pre_ping", 0), 0)


async def test_server_restart_fails_only_the_query_in_flight_and_the_next_requests_succeed(
    make_engine: EngineFactory, restartable_server: TestDatabase, app_name: str
) -> None:
    server = restartable_server
    assert server.server is not None
    engine = make_engine(server.url, pool_size=3, max_overflow=0, pre_ping_skip_window=0)
    await warm(engine, 3)
    running = await start_in_flight(engine, server, app_name)

    await asyncio.to_thread(server.server.restart)  # pg_ctl restart -m fast

    with pytest.raises(sa_exc.DBAPIError) as failed:
        await running
    assert failed.value.connection_invalidated and is_disconnect(failed.value)
    assert [await query(engine) for _ in range(20)] == [1] * 20
    # The two idle connections the restart killed never reached a caller:
    # the pre-ping replaced them, or the pool's maintenance did first.
    stats = statistics(engine)
    found = reasons(engine)
    assert found.pop(classify(failed.value)) == 1
    assert set(found) <= {"pre_ping", "idle_dead"} and sum(found.values()) == 2
    assert (stats.pre_ping_failures, stats.checked_out) == (found.get("pre_ping", 0), 0)


async def test_idle_session_timeout_expiry_is_invisible_to_the_next_requests(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(
        pool_size=3,
        max_overflow=0,
        pre_ping_skip_window=0,
        engine_options={"connect_args": {"server_settings": {"idle_session_timeout": "300"}}},
    )
    await warm(engine, 3)

    async def expired() -> bool:
        return not await database.backends(app_name)

    await wait_for_async(expired, what="the server to end the idle sessions")
    # Back to back, so the fresh connections never sit idle for 300 ms.
    assert [await query(engine) for _ in range(10)] == [1] * 10
    stats = statistics(engine)
    assert (stats.pre_ping_failures, stats.checked_out) == (3, 0)


async def test_read_only_primary_after_a_failover_invalidates_the_whole_pool(
    make_engine: EngineFactory, restartable_server: TestDatabase, app_name: str
) -> None:
    # A demoted primary answers writes with 25006 on every connection: the
    # pool drops them all at once instead of failing one request per connection.
    server = restartable_server
    await server.fetch("CREATE TABLE IF NOT EXISTS failover_items (id serial PRIMARY KEY)")
    engine = make_engine(server.url, pool_size=3, max_overflow=0)
    old_pids = await warm(engine, 3)

    async def write() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO failover_items DEFAULT VALUES"))

    async def server_read_only(on: bool) -> bool:
        value = "on" if on else "off"
        return bool(await server.fetchval("SHOW default_transaction_read_only") == value)

    await server.fetch("ALTER SYSTEM SET default_transaction_read_only = on")
    await server.fetch("SELECT pg_reload_conf()")
    try:
        await wait_for_async(lambda: server_read_only(True), what="the server to turn read-only")
        with pytest.raises(sa_exc.DBAPIError) as failed:
            # The pooled backends take the reload in a moment: write until refused.
            for _ in range(100):
                await write()
        assert classify(failed.value) == "read_only_transaction"
        assert failed.value.connection_invalidated and is_disconnect(failed.value)
        assert reasons(engine) == {"read_only_transaction": 3}

        async def old_backends_gone() -> bool:
            pids = await server.fetch("SELECT pid FROM pg_stat_activity")
            return not old_pids & {r["pid"] for r in pids}

        await wait_for_async(old_backends_gone, what="every pooled backend to be closed")
    finally:
        await server.fetch("ALTER SYSTEM RESET default_transaction_read_only")
        await server.fetch("SELECT pg_reload_conf()")
    await wait_for_async(lambda: server_read_only(False), what="the server to accept writes")
    await write()  # the pool recovered by itself: fresh connections, no restart
    assert statistics(engine).checked_out == 0


async def test_a_write_in_the_applications_own_read_only_transaction_leaves_the_pool_alone(
    make_engine: EngineFactory,
    database: TestDatabase,
    app_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 25006 on a healthy primary: the request's own bug, not a failover.
    engine = make_engine(pool_size=3, max_overflow=0)
    pids = await warm(engine, 3)
    attempts = 0

    @asyncpool.retry(attempts=3, backoff=0.01)
    async def write_in_a_read_only_transaction() -> None:
        nonlocal attempts
        attempts += 1
        async with engine.begin() as conn:
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            await conn.execute(text("CREATE TABLE never_created (id int)"))

    with pytest.raises(sa_exc.DBAPIError) as failed:
        await write_in_a_read_only_transaction()
    assert attempts == 1
    assert classify(failed.value) == "read_only_transaction"
    assert not failed.value.connection_invalidated and not is_disconnect(failed.value)
    assert reasons(engine) == {}
    assert not [r for r in caplog.records if "demoted" in r.getMessage()]
    # The server: the same three backends, none left in a transaction.
    backends = await database.backends(app_name)
    assert {r["pid"] for r in backends} == pids
    assert {r["state"] for r in backends} == {"idle"}
    assert statistics(engine).checked_out == 0


async def test_a_burst_of_read_only_errors_asks_the_server_once(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=10, max_overflow=0)
    await warm(engine, 10)
    connects = 0

    @event.listens_for(engine.sync_engine, "do_connect")
    def count_connects(*args: Any) -> None:
        nonlocal connects
        connects += 1

    async def write_in_a_read_only_transaction() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            await conn.execute(text("CREATE TABLE never_created (id int)"))

    results = await asyncio.gather(
        *(write_in_a_read_only_transaction() for _ in range(10)), return_exceptions=True
    )
    assert all(
        isinstance(r, sa_exc.DBAPIError) and classify(r) == "read_only_transaction" for r in results
    )
    assert connects == 1  # one fresh connection asked; the pool opened none
    assert reasons(engine) == {}

    async def only_the_pooled_backends_are_left() -> bool:
        return len(await database.backends(app_name)) == 10

    await wait_for_async(only_the_pooled_backends_are_left, what="the asking backend to end")


@pytest.mark.asyncpg_only  # psycopg: psycopg's connect_timeout is whole seconds, at least 2
async def test_asking_a_black_holed_server_whether_it_is_read_only_is_bounded(
    make_engine: EngineFactory,
    database: TestDatabase,
    fault_proxy: FaultProxy,
    app_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The driver would wait 30 s to connect; the question gets
    # connect_timeout + pre_ping_timeout, then the error goes to the caller.
    engine = make_engine(
        pool_size=1,
        max_overflow=0,
        connect_timeout=0.3,
        pre_ping_timeout=0.3,
        engine_options={"connect_args": {"timeout": 30}},
    )
    (pid,) = await warm(engine, 1)
    fault_proxy.black_hole()

    @event.listens_for(engine.sync_engine, "do_connect")
    def through_the_black_hole(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        cparams.update(host="127.0.0.1", port=fault_proxy.port)

    started = time.monotonic()
    with pytest.raises(sa_exc.DBAPIError) as failed:
        async with engine.begin() as conn:
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            await conn.execute(text("CREATE TABLE never_created (id int)"))
    assert time.monotonic() - started < 0.6 + SLACK
    assert not failed.value.connection_invalidated and not is_disconnect(failed.value)
    assert any("could not be told" in r.getMessage() for r in caplog.records)
    assert reasons(engine) == {}
    assert [(r["pid"], r["state"]) for r in await database.backends(app_name)] == [(pid, "idle")]


# ---------------------------------------------------------- network faults


@pytest.mark.asyncpg_only  # psycopg: psycopg's connect_timeout is whole seconds, at least 2
async def test_black_holed_checkout_gives_up_within_its_timeouts_and_the_pool_recovers(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy
) -> None:
    timeouts = {"pre_ping_timeout": 0.3, "pool_timeout": 0.5, "connect_timeout": 0.4}
    engine = make_engine(
        proxied_url(database, fault_proxy),
        pool_size=2,
        max_overflow=0,
        pre_ping_skip_window=0,
        **timeouts,
    )
    await warm(engine, 2)
    fault_proxy.black_hole()

    async def timed_checkout() -> tuple[float, BaseException | None]:
        started = time.perf_counter()
        try:
            await query(engine)
        except Exception as exc:
            return time.perf_counter() - started, exc
        return time.perf_counter() - started, None

    # Two callers get the idle connections (the ping times out, the
    # reconnect times out); the others wait, then give up or get a slot.
    outcomes = await asyncio.gather(*(timed_checkout() for _ in range(6)))
    bound = sum(timeouts.values()) + SLACK
    for waited, error in outcomes:
        assert waited < bound
        assert isinstance(error, TimeoutError | PoolTimeoutError)
    assert any(isinstance(error, PoolTimeoutError) for _, error in outcomes)
    stats = statistics(engine)
    assert (stats.pre_ping_failures, stats.checked_out) == (2, 0)

    fault_proxy.forward()
    assert [await query(engine) for _ in range(10)] == [1] * 10
    assert statistics(engine).checked_out == 0


@pytest.mark.asyncpg_only  # psycopg: command_timeout is statement_timeout (server-side)
async def test_black_holed_query_fails_after_command_timeout_and_the_pool_recovers(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy
) -> None:
    engine = make_engine(
        proxied_url(database, fault_proxy),
        pool_size=2,
        max_overflow=0,
        command_timeout=0.5,
        pre_ping_timeout=0.3,
        connect_timeout=0.5,
    )
    await warm(engine, 2)
    conn = await engine.connect()
    await conn.execute(text("SELECT 1"))
    fault_proxy.black_hole()
    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        await conn.execute(text("SELECT 1"))
    assert 0.5 <= time.perf_counter() - started < 0.5 + SLACK
    # Its state is unknown (a cancel request is pending on a dead link): it is
    # aborted, so giving it back never waits for a rollback that cannot come.
    started = time.perf_counter()
    await conn.close()
    assert time.perf_counter() - started < SLACK
    assert reasons(engine) == {"timeout": 1}

    fault_proxy.forward()
    assert [await query(engine) for _ in range(10)] == [1] * 10
    assert statistics(engine).checked_out == 0


async def test_reset_connections_fail_only_the_query_in_flight(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy, app_name: str
) -> None:
    engine = make_engine(
        proxied_url(database, fault_proxy), pool_size=3, max_overflow=0, pre_ping_skip_window=0
    )
    await warm(engine, 3)
    running = await start_in_flight(engine, database, app_name)
    assert fault_proxy.reset() == 3
    with pytest.raises(sa_exc.DBAPIError) as failed:
        await running
    assert is_disconnect(failed.value) and failed.value.connection_invalidated
    assert [await query(engine) for _ in range(10)] == [1] * 10
    stats = statistics(engine)
    assert (stats.pre_ping_failures, stats.checked_out) == (2, 0)


# ----------------------------------------------------------------- overload


async def test_overload_is_refused_fast_with_the_numbers_and_the_pool_is_usable_after(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=3, max_overflow=0, max_waiting=4, pool_timeout=1.0)
    await warm(engine, 3)
    release = asyncio.Event()

    async def hold() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            await release.wait()

    holders = [asyncio.ensure_future(hold()) for _ in range(3)]
    await wait_until(lambda: statistics(engine).checked_out == 3, what="the pool to be taken")

    async def timed() -> tuple[float, BaseException | None]:
        started = time.perf_counter()
        try:
            await query(engine)
        except Exception as exc:
            return time.perf_counter() - started, exc
        return time.perf_counter() - started, None

    storm = [asyncio.ensure_future(timed()) for _ in range(50)]
    outcomes = await asyncio.gather(*storm)
    refused = [(t, e) for t, e in outcomes if isinstance(e, PoolOverloadedError)]
    timed_out = [
        (t, e)
        for t, e in outcomes
        if isinstance(e, PoolTimeoutError) and not isinstance(e, PoolOverloadedError)
    ]
    assert (len(refused), len(timed_out)) == (46, 4)
    assert all(t < 0.25 for t, _ in refused)  # at once, not after pool_timeout
    assert all(1.0 <= t < 1.0 + SLACK for t, _ in timed_out)
    overloaded = refused[0][1]
    assert isinstance(overloaded, PoolOverloadedError)
    assert (overloaded.checked_out, overloaded.waiting) == (3, 4)
    for fragment in (app_name, "max_waiting=4", "3 of 3", "pool_size=3", "max_overflow=0"):
        assert fragment in str(overloaded)
    timeout = timed_out[0][1]
    assert isinstance(timeout, PoolTimeoutError)
    assert "pool_timeout=1" in str(timeout) and "3 of 3" in str(timeout)

    release.set()
    await asyncio.gather(*holders)
    stats = statistics(engine)
    assert (stats.rejected, stats.timeouts, stats.checked_out, stats.waiting) == (46, 4, 0, 0)
    # Fully usable after the storm: all three connections at once, no new connect.
    assert await asyncio.gather(*(query(engine, "SELECT 1") for _ in range(3))) == [1, 1, 1]
    assert statistics(engine).connects == 3


# -------------------------------------------------------------------- retry


async def test_retry_reruns_a_unit_of_work_whose_backend_was_killed(
    make_engine: EngineFactory, database: TestDatabase
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    attempts = 0

    @asyncpool.retry(attempts=3, backoff=0.01)
    async def read_after_kill() -> int:
        nonlocal attempts
        attempts += 1
        async with engine.begin() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            if attempts == 1:
                await database.fetchval("SELECT pg_terminate_backend($1)", pid)
            return int((await conn.execute(text("SELECT 41 + 1"))).scalar_one())

    assert await read_after_kill() == 42
    assert attempts == 2
    assert statistics(engine).checked_out == 0


async def test_retry_attempts_as_context_managers_rerun_the_block(
    make_engine: EngineFactory, database: TestDatabase
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    numbers = []
    async for attempt in asyncpool.retry(attempts=2, backoff=0.01):
        async with attempt, engine.begin() as conn:
            numbers.append(attempt.number)
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            if attempt.number == 1:
                await database.fetchval("SELECT pg_terminate_backend($1)", pid)
            await conn.execute(text("SELECT 1"))
    assert numbers == [1, 2]


async def test_retry_never_reruns_a_non_disconnect_error(make_engine: EngineFactory) -> None:
    engine = make_engine(pool_size=1, max_overflow=0)
    attempts = 0

    @asyncpool.retry(attempts=3, backoff=0.01)
    async def divide() -> None:
        nonlocal attempts
        attempts += 1
        await query(engine, "SELECT 1 / 0")

    with pytest.raises(sa_exc.DBAPIError, match="division by zero"):
        await divide()
    assert attempts == 1


async def test_retry_gives_up_after_its_attempts_with_the_last_error(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy
) -> None:
    engine = make_engine(proxied_url(database, fault_proxy), pool_size=1, max_overflow=0)
    fault_proxy.reset(refuse=True)  # every connection attempt is reset
    attempts = 0

    @asyncpool.retry(attempts=3, backoff=0.01)
    async def unreachable() -> None:
        nonlocal attempts
        attempts += 1
        await query(engine)

    with pytest.raises(Exception) as failed:
        await unreachable()
    assert attempts == 3 and is_disconnect(failed.value)
    assert statistics(engine).checked_out == 0


async def test_retry_reruns_an_insert_else_update_whose_update_lost_its_connection(
    make_engine: EngineFactory, database: TestDatabase, fault_proxy: FaultProxy, app_name: str
) -> None:
    # The update's disconnect is raised while the insert's 23505 is being
    # handled: it is still a disconnect, and the whole unit runs again.
    engine = make_engine(proxied_url(database, fault_proxy), pool_size=1, max_overflow=0)
    await database.fetch("CREATE TABLE IF NOT EXISTS upsert_counts (id int PRIMARY KEY, n int)")
    await database.fetch(
        "INSERT INTO upsert_counts VALUES (1, 0) ON CONFLICT (id) DO UPDATE SET n = 0"
    )
    attempts = 0

    @asyncpool.retry(attempts=3, backoff=0.01)
    async def insert_else_update() -> None:
        nonlocal attempts
        attempts += 1
        async with engine.connect() as conn:
            try:
                async with conn.begin():
                    await conn.execute(text("INSERT INTO upsert_counts VALUES (1, 1)"))
            except sa_exc.IntegrityError:
                if attempts == 1:
                    fault_proxy.reset()
                async with conn.begin():
                    await conn.execute(text("UPDATE upsert_counts SET n = n + 1 WHERE id = 1"))

    await insert_else_update()
    assert attempts == 2
    assert await database.fetchval("SELECT n FROM upsert_counts WHERE id = 1") == 1

    async def only_the_new_backend_is_left() -> bool:
        return [r["state"] for r in await database.backends(app_name)] == ["idle"]

    await wait_for_async(only_the_new_backend_is_left, what="the reset backend to exit")
    assert statistics(engine).checked_out == 0
