"""Is the server read-only? Asked after SQLSTATE 25006, on a fresh connection.

25006 (read-only transaction) comes from two very different places: a write
inside the application's own ``READ ONLY`` transaction (a bug in one request;
the server and the pool are fine), and every write after a failover demoted
the primary (every pooled connection now points at a replica). The failed
connection cannot tell them apart (its transaction is aborted), but a fresh
one can: it starts read-only only when the server is in recovery or
configured ``default_transaction_read_only``.

The question is bounded (a connect and one round trip, ``timeout``), asked
by at most one task per pool at a time, and its answer is reused for
``REUSE_VERDICT`` seconds, so a burst of 25006 errors costs one connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any, Final

from sqlalchemy.util import await_only, greenlet_spawn

__all__ = ["server_is_read_only"]

logger = logging.getLogger("asyncpool.pool")

#: Seconds an answer is reused for later 25006 errors of the same pool.
REUSE_VERDICT: Final = 1.0

#: True on a standby (a demoted primary) or a server told to refuse writes.
_QUERY: Final = (
    "SELECT pg_is_in_recovery() OR current_setting('default_transaction_read_only')::boolean"
)


class _Probe:
    """The latest question asked about one pool's server."""

    __slots__ = ("asked_at", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[bool | None] | None = None
        self.asked_at = 0.0


_probes: weakref.WeakKeyDictionary[Any, _Probe] = weakref.WeakKeyDictionary()


def server_is_read_only(pool: Any, dialect: Any, timeout: float) -> bool | None:
    """True if a fresh connection of ``pool``'s is read-only, False if not, None if unknown.

    Call from SQLAlchemy's sync code under asyncio (a ``handle_error``
    listener): it waits for the answer through SQLAlchemy's greenlet bridge.
    """
    try:
        loop = asyncio.get_running_loop()
        probe = _probes.setdefault(pool, _Probe())
        task = probe.task
        stale = time.monotonic() - probe.asked_at >= REUSE_VERDICT
        if task is None or task.get_loop() is not loop or (task.done() and stale):
            probe.asked_at = time.monotonic()
            probe.task = task = loop.create_task(_ask(pool, dialect, timeout))
        # Shielded: a cancelled caller must not cancel the answer others wait for.
        verdict: bool | None = await_only(asyncio.shield(task))
        return verdict
    except Exception:
        logger.debug("could not ask whether the server is read-only", exc_info=True)
        return None


async def _ask(pool: Any, dialect: Any, within: float) -> bool | None:
    try:
        async with asyncio.timeout(within):
            return await greenlet_spawn(_ask_on_a_fresh_connection, pool, dialect)
    except Exception:
        logger.debug("could not ask whether the server is read-only", exc_info=True)
        return None


def _ask_on_a_fresh_connection(pool: Any, dialect: Any) -> bool:
    # The pool's creator: the engine's own connect arguments (TLS, server
    # settings, connect timeout) and do_connect hooks, outside the pool.
    connection = pool._creator()
    try:
        cursor = connection.cursor()
        cursor.execute(_QUERY)
        (read_only,) = cursor.fetchone()
        return bool(read_only)
    finally:
        dialect.do_terminate(connection)  # no round trip
