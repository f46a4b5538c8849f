"""A real PgBouncer in transaction mode, in front of the test database.

Debian's ``pgbouncer`` binary (``.ci/run`` installs it), started by the tests
on a free loopback port with its own config in a temporary directory:
``pool_mode = transaction``, a small ``default_pool_size`` so that client
connections really share server connections, and an admin console
(database ``pgbouncer``) for ``RECONNECT``. PgBouncer refuses to run as root,
so as root it runs as the system user the embedded PostgreSQL uses.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from asyncpool.embedded import free_port
from tests.fix_db import TestDatabase

#: Non-root users PgBouncer may run as, in order of preference.
_RUN_AS: Final = ("embedded_postgres", "postgres", "nobody")

#: How PgBouncer logs closing a server connection that RECONNECT made obsolete.
_REPLACED: Final = re.compile(
    r"S-0x[0-9a-f]+: .* closing because: "
    r"(?:close_needed|obsolete connection|database configuration changed)"
)

#: The database name clients use; PgBouncer maps it to the real one.
DATABASE: Final = "app"


class PgBouncer:
    """One PgBouncer process; ``with`` starts and stops it."""

    def __init__(
        self,
        *,
        server_host: str,
        server_port: int,
        server_database: str,
        user: str,
        password: str | None = None,
        pool_size: int = 4,
        settings: dict[str, object] | None = None,
    ) -> None:
        self.port = free_port()
        self.user = user
        self._dir = Path(tempfile.mkdtemp(prefix="asyncpool-pgbouncer-"))
        self.log_file = self._dir / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._run_as = _run_as_user()
        target = f"host={server_host} port={server_port} dbname={server_database}"
        if password:
            target += f" password={password}"
        conf = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": self._dir / "userlist.txt",
            "admin_users": user,
            "pool_mode": "transaction",
            "default_pool_size": pool_size,
            "max_client_conn": 500,
            "logfile": self.log_file,
            "pidfile": self._dir / "pgbouncer.pid",
            **(settings or {}),
        }
        lines = ["[databases]", f"{DATABASE} = {target}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in conf.items()]
        (self._dir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        (self._dir / "userlist.txt").write_text(f'"{user}" ""\n')
        os.chmod(self._dir, 0o700)
        if self._run_as is not None:
            uid, gid = self._run_as
            for path in (self._dir, *self._dir.iterdir()):
                os.chown(path, uid, gid)

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        kwargs = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as[0], "group": self._run_as[1]}
        self._process = subprocess.Popen(
            ["pgbouncer", str(self._dir / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **kwargs,  # type: ignore[arg-type]
        )
        deadline = time.monotonic() + 15
        while not _accepts(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer did not start:\n{self.log()[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def servers_replaced(self) -> int:
        """Server connections PgBouncer closed because of ``RECONNECT`` (from its log)."""
        return len(_REPLACED.findall(self.log()))

    async def admin(self, command: str) -> str:
        """Run one admin-console command (``RECONNECT``, ``SHOW POOLS``); its status."""
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user=self.user, database="pgbouncer"
        )
        try:
            return str(await conn.execute(command))
        finally:
            await conn.close()

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def _run_as_user() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise RuntimeError(f"pgbouncer refuses to run as root and none of {_RUN_AS} exists")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def pgbouncer_for(database: TestDatabase, **kwargs: object) -> PgBouncer:
    """A PgBouncer (not started) in front of the test database."""
    url = make_url(database.dsn)
    return PgBouncer(
        server_host=url.host or "127.0.0.1",
        server_port=url.port or 5432,
        server_database=url.database or "postgres",
        user=url.username or "postgres",
        password=url.password,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def pgbouncer(database: TestDatabase) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode with ``default_pool_size = 4``, for one test module."""
    with pgbouncer_for(database, pool_size=4) as bouncer:
        yield bouncer
