"""Fork safety: children of a parent that used the engine open their own connections.

The parent holds one connection checked out and one idle across the fork.
Each child (``os.fork`` and ``multiprocessing`` with the fork start method)
queries on the inherited engine object with no hook of its own; it must get
backends of its own, and the parent's two connections must keep working.
gunicorn ``--preload`` is covered by test_app_process.py.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import traceback
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from asyncpool import statistics
from tests.fix_db import EngineFactory, TestDatabase
from tests.fix_loops import run

#: Concurrent queries each child runs (over the pool's two connections).
CHILD_QUERIES = 20


async def backend_pid(conn: AsyncConnection) -> int:
    return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


def child_work(engine: AsyncEngine) -> dict[str, Any]:
    """What every child runs: concurrent queries on a fresh loop; never raises."""

    async def one() -> int:
        async with engine.connect() as conn:
            pid = await backend_pid(conn)
            await conn.execute(text("SELECT pg_sleep(0.01)"))
            return pid

    async def main() -> list[int]:
        try:
            return list(await asyncio.gather(*(one() for _ in range(CHILD_QUERIES))))
        finally:
            await engine.dispose()

    try:
        return {"pids": sorted(set(run(main())))}
    except BaseException:
        return {"error": traceback.format_exc()}


def fork_child(engine: AsyncEngine) -> tuple[int, int]:
    """os.fork() a child that reports child_work() as JSON on a pipe; (pid, read end)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "w") as out:
                result = child_work(engine)
                out.write(json.dumps(result))
            code = 0 if "pids" in result else 1
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def collect(pid: int, read_end: int) -> dict[str, Any]:
    with os.fdopen(read_end) as pipe:
        raw = pipe.read()
    _, status = os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(raw) if raw else {"error": "no output"}
    result["exit_code"] = os.waitstatus_to_exitcode(status)
    return result


async def parent_with_a_held_and_an_idle_connection(
    engine: AsyncEngine, start: Callable[[], Callable[[], list[dict[str, Any]]]]
) -> tuple[set[int], list[dict[str, Any]]]:
    """Use the engine, fork the children (``start``, which returns how to wait
    for their results) and keep querying on the held connection meanwhile.

    The fork happens on the loop's thread, as in an app that starts workers;
    forking from an executor thread is not something multiprocessing supports.
    """
    async with engine.connect() as held:
        async with engine.connect() as idle_later:
            parent_pids = {await backend_pid(held), await backend_pid(idle_later)}
        assert statistics(engine).idle == 1
        forking = asyncio.ensure_future(asyncio.to_thread(start()))
        parent_queries = 0
        while not forking.done():
            assert await backend_pid(held) in parent_pids
            parent_queries += 1
        results = await forking
        assert parent_queries > 0
        # The parent's connections still work, on their original backends.
        async with engine.connect() as again:
            assert await backend_pid(again) in parent_pids
        assert await backend_pid(held) in parent_pids
    return parent_pids, results


def assert_children_had_their_own_backends(
    parent_pids: set[int], results: list[dict[str, Any]]
) -> None:
    seen: set[int] = set(parent_pids)
    for result in results:
        assert "error" not in result, result["error"]
        assert result["exit_code"] == 0
        child_pids = set(result["pids"])
        assert 1 <= len(child_pids) <= 2
        assert not child_pids & seen, "a child used a backend of the parent or of a sibling"
        seen |= child_pids


async def test_os_fork_children_open_their_own_connections_and_the_parent_keeps_its_own(
    make_engine: EngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0)

    def fork_two() -> Callable[[], list[dict[str, Any]]]:
        children = [fork_child(engine), fork_child(engine)]
        return lambda: [collect(pid, fd) for pid, fd in children]

    parent_pids, results = await parent_with_a_held_and_an_idle_connection(engine, fork_two)
    assert_children_had_their_own_backends(parent_pids, results)
    # The children's backends are gone; the parent's are all that is left.
    backends = {r["pid"] for r in await database.backends(app_name)}
    assert backends == parent_pids
    stats = statistics(engine)
    assert (stats.invalidations, stats.pre_ping_failures) == (0, 0)


def _multiprocessing_target(engine: AsyncEngine, queue: Any) -> None:
    queue.put(child_work(engine))


async def test_multiprocessing_fork_children_open_their_own_connections(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0)
    context = multiprocessing.get_context("fork")

    def start_two() -> Callable[[], list[dict[str, Any]]]:
        queue = context.Queue()
        processes = [
            context.Process(target=_multiprocessing_target, args=(engine, queue)) for _ in range(2)
        ]
        for process in processes:
            process.start()

        def wait() -> list[dict[str, Any]]:
            results = [queue.get(timeout=30) for _ in processes]
            for process, result in zip(processes, results, strict=True):
                process.join(30)
                result["exit_code"] = process.exitcode
            queue.close()
            queue.join_thread()
            return results

        return wait

    parent_pids, results = await parent_with_a_held_and_an_idle_connection(engine, start_two)
    assert_children_had_their_own_backends(parent_pids, results)
    assert statistics(engine).invalidations == 0
