"""A real streaming replica on loopback: an embedded primary and a standby made with pg_basebackup.

The primary is an ``EmbeddedPostgres`` with ``wal_level = replica``; the
standby is ``pg_basebackup -R`` of it (same binaries), started on another
port with ``recovery_min_apply_delay`` so that it lags behind on purpose: a
read that goes to the replica right after a write does not see it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from asyncpool.embedded import EmbeddedPostgres

#: How far the replica lags behind: long enough that a read-after-write on the
#: replica misses the write every time, short enough to wait out in a test.
APPLY_DELAY: Final = 0.3


@dataclass
class ReplicaSet:
    """A primary and its streaming replica, both running."""

    primary: EmbeddedPostgres
    replica: EmbeddedPostgres

    @property
    def primary_url(self) -> str:
        return self.primary.url("postgres")

    @property
    def replica_url(self) -> str:
        return self.replica.url("postgres")


def start_replica_set(*, apply_delay: float = APPLY_DELAY) -> ReplicaSet:
    """Start a primary, base-backup it into a standby and start that (caller cleans up)."""
    primary = EmbeddedPostgres(settings={"wal_level": "replica", "max_wal_senders": 4})
    primary.start()
    replica = EmbeddedPostgres(
        settings={
            "hot_standby": "on",
            "recovery_min_apply_delay": f"'{int(apply_delay * 1000)}ms'",
            "hot_standby_feedback": "on",
        }
    )
    try:
        _base_backup(primary, replica.data_dir)
        replica.init()  # PG_VERSION exists: no initdb, only port and settings appended
        replica.start()
    except BaseException:
        replica.cleanup()
        primary.cleanup()
        raise
    return ReplicaSet(primary, replica)


def _base_backup(primary: EmbeddedPostgres, target: Path) -> None:
    """``pg_basebackup -R`` into ``target``, owned like the primary's data directory."""
    owner = primary.data_dir.stat()
    with tempfile.TemporaryFile() as out:
        result = subprocess.run(
            [
                str(primary.bin_dir / "pg_basebackup"),
                *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"),
                *("-D", str(target), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            out.seek(0)
            raise RuntimeError(f"pg_basebackup failed: {out.read().decode(errors='replace')}")
    if os.geteuid() == 0:  # the server runs as the primary's (non-root) owner
        for root, dirs, files in os.walk(target):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, owner.st_uid, owner.st_gid)
    # The copied server.log / postmaster.pid belong to the primary, not the standby.
    for stale in ("postmaster.pid", "postmaster.opts"):
        (target / stale).unlink(missing_ok=True)
    shutil.rmtree(target / "log", ignore_errors=True)


@pytest.fixture(scope="module")
def replica_set() -> Iterator[ReplicaSet]:
    """A primary with a lagging streaming replica, for one test module."""
    replicas = start_replica_set()
    try:
        yield replicas
    finally:
        replicas.replica.cleanup()
        replicas.primary.cleanup()
