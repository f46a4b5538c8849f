"""asyncpool.run(): sync code calling async database code keeps its pooled connections.

The tests are plain ``def`` tests (``asyncpool.run`` refuses a running loop);
the server is read with ``asyncio.run`` on connections of its own. Each test
closes the main thread's kept loop at the end (``asyncpool.runner.close()``),
which also disposes the engines that loop owns.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncpool
from asyncpool import statistics
from tests.fix_db import SyncEngineFactory, TestDatabase, wait_for_async

ROOT = Path(__file__).resolve().parents[2]
CALLS = 100

#: What a clean exit or a healthy worker never prints.
FORBIDDEN = (
    "Event loop is closed",
    "non-checked-in connection",
    "was never awaited",
    "Task was destroyed",
    "Traceback",
    "unknown protocol state",
    "another operation is in progress",
    "ProtocolError",
    "InterfaceError",
)


async def backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def loop_id() -> int:
    return id(asyncio.get_running_loop())


def no_backends_left(database: TestDatabase, application_name: str, within: float = 10) -> None:
    async def none() -> bool:
        return not await database.backends(application_name)

    asyncio.run(wait_for_async(none, what=f"{application_name}'s backends to go", within=within))


@pytest.mark.parametrize("loop_factory", [None, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_sequential_runs_reuse_the_pooled_connections(
    make_sync_engine: SyncEngineFactory,
    database: TestDatabase,
    app_name: str,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None,
) -> None:
    engine = make_sync_engine(pool_size=3)
    pids = {asyncpool.run(backend_pid(engine), loop_factory=loop_factory) for _ in range(CALLS)}
    stats = statistics(engine)
    assert stats.checkouts == CALLS
    assert stats.connects <= 3 and len(pids) <= stats.connects
    assert {r["pid"] for r in asyncio.run(database.backends(app_name))} == pids
    asyncpool.run(engine.dispose())
    no_backends_left(database, app_name)


def test_asyncio_run_connects_again_on_every_call(
    make_sync_engine: SyncEngineFactory, database: TestDatabase, app_name: str
) -> None:
    """The baseline asyncpool.run improves on: a new loop per call, a connect per call."""
    engine = make_sync_engine(pool_size=3)
    for _ in range(CALLS):
        asyncio.run(backend_pid(engine))
    assert statistics(engine).connects >= 90
    asyncio.run(engine.dispose())
    no_backends_left(database, app_name)


async def test_run_inside_a_running_loop_says_to_await() -> None:
    coro = loop_id()
    with pytest.raises(RuntimeError, match=r"asyncpool\.run\(\).*running event loop.*`await`"):
        asyncpool.run(coro)
    assert inspect.getcoroutinestate(coro) == "CORO_CLOSED"  # no "never awaited" warning


def test_another_loop_factory_on_a_thread_with_a_kept_loop_is_refused(
    make_sync_engine: SyncEngineFactory,
) -> None:
    first = asyncpool.run(loop_id())
    with pytest.raises(RuntimeError, match=r"uvloop.*asyncpool\.runner\.close\(\)"):
        asyncpool.run(loop_id(), loop_factory=uvloop.new_event_loop)
    assert asyncpool.run(loop_id()) == first
    asyncpool.runner.close()
    assert asyncpool.run(loop_id(), loop_factory=uvloop.new_event_loop) != first


def test_exceptions_and_cancellation_propagate_and_the_loop_stays(
    make_sync_engine: SyncEngineFactory,
) -> None:
    engine = make_sync_engine(pool_size=1)

    async def fails() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1/0"))

    async def cancelled() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            raise asyncio.CancelledError

    first = asyncpool.run(backend_pid(engine))
    with pytest.raises(Exception, match="division by zero"):
        asyncpool.run(fails())
    with pytest.raises(asyncio.CancelledError):
        asyncpool.run(cancelled())
    assert asyncpool.run(backend_pid(engine)) == first
    assert statistics(engine).connects == 1


def _child_runs(engine: AsyncEngine, queue: Any) -> None:
    try:
        queue.put(("ok", asyncpool.run(backend_pid(engine)), asyncpool.run(loop_id())))
    except BaseException as exc:
        queue.put(("error", repr(exc), 0))


def test_forked_child_runs_on_its_own_loop_and_backend_and_the_parent_keeps_its_own(
    make_sync_engine: SyncEngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_sync_engine(pool_size=2)
    parent_backend = asyncpool.run(backend_pid(engine))
    parent_loop = asyncpool.run(loop_id())
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_runs, args=(engine, queue))
    child.start()
    status, child_backend, child_loop = queue.get(timeout=30)
    child.join(30)
    queue.close()
    queue.join_thread()
    assert status == "ok", child_backend
    assert child.exitcode == 0
    assert child_backend != parent_backend
    assert child_loop != parent_loop  # the parent's loop object is still in the child
    # The parent's connection was left alone: same backend, no reconnect.
    assert asyncpool.run(backend_pid(engine)) == parent_backend
    assert statistics(engine).connects == 1
    assert {r["pid"] for r in asyncio.run(database.backends(app_name))} == {parent_backend}


def epoll_registrations() -> dict[int, set[str]]:
    """This process's epoll instances and the descriptors registered in each (Linux)."""
    found: dict[int, set[str]] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                found[int(fd)] = {line.split()[1] for line in info if line.startswith("tfd:")}
        except OSError:  # the descriptor listdir itself used, gone
            continue
    return found


def test_a_child_that_drops_the_inherited_loop_leaves_the_parents_epoll_alone(
    make_sync_engine: SyncEngineFactory,
) -> None:
    """The parent's loop and the child's inherited copy share one epoll
    instance: closing the copy in the child (even through its finaliser, at
    a garbage collection) would unregister the parent's self-pipe, and the
    parent's loop would no longer wake for call_soon_threadsafe. The child
    holds it instead."""
    asyncpool.run(loop_id())
    before = epoll_registrations()
    assert any(before.values())
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            asyncpool.run(loop_id())
            asyncpool.runner.close()
            # As outside pytest: a finaliser's ResourceWarning is no error.
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert epoll_registrations() == before


def test_each_thread_gets_its_own_kept_loop(
    make_sync_engine: SyncEngineFactory, database: TestDatabase, app_name: str
) -> None:
    engines = [make_sync_engine(name=f"{app_name}-{i}", pool_size=2) for i in range(4)]
    all_started = threading.Barrier(len(engines))
    loops: dict[int, set[int]] = defaultdict(set)
    backends: dict[int, set[int]] = defaultdict(set)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            all_started.wait(10)  # all four threads alive at once: no id is reused
            for _ in range(10):
                loops[i].add(asyncpool.run(loop_id()))
                backends[i].add(asyncpool.run(backend_pid(engines[i])))
            all_started.wait(10)
            asyncpool.runner.close()  # disposes engines[i] on its loop
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert all(len(ids) == 1 for ids in loops.values())
    assert len(set().union(*loops.values())) == len(engines)
    assert [(statistics(e).connects, statistics(e).size) for e in engines] == [(1, 0)] * 4
    assert all(len(pids) == 1 for pids in backends.values())
    no_backends_left(database, app_name)


def test_a_finished_threads_loop_is_closed_when_another_thread_makes_one(
    make_sync_engine: SyncEngineFactory, database: TestDatabase, app_name: str
) -> None:
    engine = make_sync_engine(pool_size=1)
    ended = threading.Thread(target=lambda: asyncpool.run(backend_pid(engine)))
    ended.start()
    ended.join(30)
    assert statistics(engine).idle == 1
    asyncpool.run(loop_id())  # a new loop, for this thread: the ended thread's is closed
    assert statistics(engine).size == 0
    no_backends_left(database, app_name)


EXIT_SCRIPT = """
import asyncio, atexit, os, sys, threading, time
import asyncpg
from sqlalchemy import text
import asyncpool

dsn, url, name, factory = sys.argv[1:5]
loop_factory = None
if factory == "uvloop":
    import uvloop
    loop_factory = uvloop.new_event_loop

async def backends():
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
        )
    finally:
        await conn.close()

def report():
    # Registered before asyncpool's exit hook, so it runs after it.
    deadline = time.monotonic() + 10
    while (left := asyncio.run(backends())) and time.monotonic() < deadline:
        time.sleep(0.02)
    print(f"left={left}")

atexit.register(report)
main = asyncpool.create_pooled_engine(url, name=name, application_name=name, pool_size=2)
other = asyncpool.create_pooled_engine(url, name=name + "-t", application_name=name)

async def job(engine):
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))

asyncpool.run(job(main), loop_factory=loop_factory)
asyncpool.run(job(main), loop_factory=loop_factory)
thread = threading.Thread(target=lambda: asyncpool.run(job(other), loop_factory=loop_factory))
thread.start()
thread.join()
assert asyncpool.statistics(main).connects == 1
assert asyncio.run(backends()) == 2, "expected the two pooled connections open"
print("ran")
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_kept_loops_dispose_their_engines_at_exit_silently(
    database: TestDatabase, app_name: str, loop: str
) -> None:
    """Nothing disposed by the script itself: at exit every kept loop, the
    main thread's and the ended thread's, disposes its engines (Terminate
    sent, backends gone while the process still lives) and closes."""
    script_args = [database.dsn, database.url, app_name, loop]
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", EXIT_SCRIPT, *script_args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.split() == ["ran", "left=0"]
    no_backends_left(database, app_name)


def _redis_reachable(host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=3) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(16)
    except OSError as exc:
        pytest.fail(f"the Celery test needs Redis at {host}:{port}: {exc}")
    if not reply.startswith(b"+PONG"):
        pytest.fail(f"Redis at {host}:{port} answered {reply!r} to PING")


@pytest.mark.slow
def test_celery_prefork_tasks_keep_a_connection_per_child(
    database: TestDatabase, app_name: str, tmp_path: Path
) -> None:
    from celery import Celery

    children, pool_size, tasks = 4, 2, 400
    _redis_reachable("127.0.0.1", 6379)
    broker = "redis://127.0.0.1:6379/7"
    client = Celery("asyncpool_runner_test_client", broker=broker, backend=broker)

    def purge() -> None:
        with client.connection_for_write() as conn:
            conn.default_channel.queue_purge(app_name)

    purge()
    log = tmp_path / "worker.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ASYNCPOOL_TEST_DSN": database.url,
        "ASYNCPOOL_CELERY_BROKER": broker,
        "ASYNCPOOL_CELERY_NAME": app_name,
        "ASYNCPOOL_CELERY_POOL_SIZE": str(pool_size),
        "ASYNCPOOL_CELERY_PARENT_QUERY": "1",
    }
    with log.open("w") as out:
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "tests.integration.celery_app", "worker"),
                *("--pool=prefork", f"--concurrency={children}", "--loglevel=INFO"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        sent = [
            client.send_task("asyncpool_test.backend_pid", queue=app_name) for _ in range(tasks)
        ]
        results = [tuple(r.get(timeout=60)) for r in sent]
        for r in sent:
            r.forget()
        # Still running: the parent's connection is still open on its backend.
        alive = {r["pid"] for r in asyncio.run(database.backends(app_name))}
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        purge()
    output = log.read_text()

    by_child: dict[int, set[int]] = defaultdict(set)
    parents = {parent for _, _, parent in results}
    for child, backend, _ in results:
        by_child[child].add(backend)
    assert len(results) == tasks
    assert len(parents) == 1 and None not in parents, parents
    parent_backend = parents.pop()
    assert 1 <= len(by_child) <= children
    assert worker.pid not in by_child
    all_backends = set().union(*by_child.values())
    assert sum(len(b) for b in by_child.values()) == len(all_backends), "a backend was shared"
    assert len(all_backends) <= children * pool_size
    assert all(len(b) <= pool_size for b in by_child.values())
    assert parent_backend not in all_backends
    assert parent_backend in alive
    assert worker.returncode == 0, output[-3000:]
    for text_ in FORBIDDEN:
        assert text_ not in output, output[-3000:]
    no_backends_left(database, app_name)
