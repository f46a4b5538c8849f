"""Real server processes: the example app under uvicorn, and gunicorn --preload with workers.

Slow by nature (a process start each), so few and lean: one SIGTERM test with
requests in flight, one fork test under gunicorn.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from asyncpool.embedded import free_port
from tests.fix_db import TestDatabase, wait_for_async

ROOT = Path(__file__).resolve().parents[2]

#: What a clean shutdown never prints.
FORBIDDEN = (
    "Event loop is closed",
    "non-checked-in connection",
    "was never awaited",
    "Task was destroyed",
    "Traceback",
    "unknown protocol state",
    "another operation is in progress",
)


@pytest.fixture
async def fresh_database(database: TestDatabase, app_name: str) -> AsyncIterator[str]:
    """A database of its own for the app (its ``users`` table), dropped afterwards."""
    name = "db_" + hashlib.sha1(app_name.encode()).hexdigest()[:10]
    await database.fetch(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await database.fetch(f"CREATE DATABASE {name}")
    yield make_url(database.dsn).set(database=name).render_as_string(hide_password=False)
    await database.fetch(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def run(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def start(
    run: list[subprocess.Popen[bytes]], args: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    run.append(process)
    return process


async def wait_healthy(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    async def healthy() -> bool:
        if process.poll() is not None:
            output = log.read_text()  # noqa: ASYNC240 - a small local file
            raise AssertionError(f"the server exited at start-up:\n{output}")
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(url + "/health")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for_async(healthy, what="the server to be healthy", within=20)


async def exit_code(process: subprocess.Popen[bytes]) -> int:
    return await asyncio.wait_for(asyncio.to_thread(process.wait), 20)


async def no_backend_left(dsn: str, app_name: str) -> None:
    """pg_stat_activity has no backend of the app within a second of its exit."""

    async def none() -> bool:
        conn = await asyncpg.connect(dsn)
        try:
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
            )
        finally:
            await conn.close()
        return bool(count == 0)

    await wait_for_async(none, what=f"no backend of {app_name}", within=1.0)


def assert_clean(log: Path) -> None:
    output = log.read_text()
    for message in FORBIDDEN:
        assert message not in output, f"{message!r} in the server's output:\n{output}"


async def test_sigterm_with_requests_in_flight_finishes_them_and_exits_cleanly(
    fresh_database: str, app_name: str, tmp_path: Path, run: list[subprocess.Popen[bytes]]
) -> None:
    port, log = free_port(), tmp_path / "uvicorn.log"
    url = f"http://127.0.0.1:{port}"
    process = start(
        run,
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)],
        {
            "DATABASE_URL": fresh_database,
            "ASYNCPOOL_APPLICATION_NAME": app_name,
            "ASYNCPOOL_POOL_SIZE": "3",
        },
        log,
    )
    await wait_healthy(process, url, log)
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:
        created = await client.post("/users", json={"name": "ada", "email": "ada@example.org"})
        assert created.status_code == 201
        user_id = created.json()["id"]
        export = await client.get("/users/export")
        assert [json.loads(line)["email"] for line in export.text.splitlines()] == [
            "ada@example.org"
        ]

        # Hold the users table so that five requests are stuck in the database.
        admin = await asyncpg.connect(fresh_database)
        try:
            await admin.execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            in_flight = [asyncio.create_task(client.get(f"/users/{user_id}")) for _ in range(5)]

            async def all_in_flight() -> bool:
                async with httpx.AsyncClient(base_url=url) as probe:
                    pools = (await probe.get("/health")).json()["pools"]
                return bool(pools["users-api"]["checked_out"] == 5)

            await wait_for_async(all_in_flight, what="five requests holding connections")
            process.send_signal(signal.SIGTERM)
            await wait_for_async(
                lambda: _logged(log, "Waiting for connections to close"),
                what="uvicorn to start shutting down",
            )
            assert process.poll() is None
            await admin.execute("COMMIT")
        finally:
            await admin.close()
        responses = await asyncio.gather(*in_flight)
    assert [r.status_code for r in responses] == [200] * 5
    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is
    # done, so the status is "terminated by SIGTERM" after a clean exit.
    assert await exit_code(process) in (0, -signal.SIGTERM)
    assert "Application shutdown complete." in log.read_text()
    assert "Finished server process" in log.read_text()
    await no_backend_left(fresh_database, app_name)
    assert_clean(log)


async def _logged(log: Path, text: str) -> bool:
    return text in log.read_text()  # noqa: ASYNC240 - a small local file


async def test_gunicorn_preload_workers_use_their_own_backends_and_the_master_keeps_its_own(
    database: TestDatabase, app_name: str, tmp_path: Path, run: list[subprocess.Popen[bytes]]
) -> None:
    port, log = free_port(), tmp_path / "gunicorn.log"
    reports = tmp_path / "reports"
    reports.mkdir()
    process = start(
        run,
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "-w",
            "2",
            "-k",
            "uvicorn.workers.UvicornWorker",
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "10",
            "tests.integration.app_preload:app",
        ],
        {
            "DATABASE_URL": database.dsn,
            "ASYNCPOOL_APPLICATION_NAME": app_name,
            "REPORT_DIR": str(reports),
            "HOME": str(tmp_path),  # gunicorn >= 25 puts its control socket under $HOME
        },
        log,
    )
    await wait_healthy(process, f"http://127.0.0.1:{port}", log)

    async def two_reports() -> bool:
        return len(list(reports.glob("*.json"))) == 2

    await wait_for_async(two_reports, what="both workers to report", within=20)
    workers = [json.loads(p.read_text()) for p in reports.glob("*.json")]
    master = {w["master"] for w in workers}
    assert len(master) == 1
    seen = set(master)
    for worker in workers:
        own = set(worker["backends"])
        assert len(own) == 2
        assert not own & seen, "a worker used the master's or a sibling's backend"
        seen |= own
    # The master's connection survived its workers' start-up and warm-up.
    backends = {r["pid"]: r["state"] for r in await database.backends(app_name)}
    assert backends.keys() == seen
    assert backends[master.pop()] == "idle"

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(10):
            answer = (await client.get("/pid")).json()
            assert answer["backend"] in seen - {workers[0]["master"]}

    process.send_signal(signal.SIGTERM)
    assert await exit_code(process) == 0
    await no_backend_left(database.dsn, app_name)
    assert_clean(log)
