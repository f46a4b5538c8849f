"""Fork safety: a forked child never touches the connections it inherited.

A child of ``fork()`` (gunicorn ``--preload``, uvicorn ``--workers``, celery
prefork, ``multiprocessing`` with the fork start method) inherits the parent's
pool: the same sockets, and asyncpg connections bound to the parent's event
loop. If the child used them, two processes would talk on one PostgreSQL
session and the protocol would desynchronise; if it closed them, the parent's
connections would die. So every engine made by ``create_pooled_engine`` is
registered here, and right after a fork the child drops them without any I/O
(SQLAlchemy's ``dispose(close=False)``; the sockets are made inert first). The
child then opens its own connections on first use; the parent's keep working.
No user hook is needed.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Final

from sqlalchemy.ext.asyncio import AsyncEngine

from ._pool import FairAsyncPool
from .engine import _engine_hooks

__all__ = ["register_engine", "registered_engines"]

logger = logging.getLogger("asyncpool.fork")

#: Every engine made by create_pooled_engine in this process (weakly held).
_engines: Final[weakref.WeakSet[AsyncEngine]] = weakref.WeakSet()

#: In a child: the inherited pools, kept alive so that no finaliser of theirs
#: ever runs against the parent's sockets or event loop.
_inherited: Final[list[Any]] = []

_hook_installed = False


def register_engine(engine: AsyncEngine) -> None:
    """Drop ``engine``'s connections in every child forked from now on.

    Called for every engine by ``create_pooled_engine``; call it yourself only
    for an engine built some other way on asyncpool's pool.
    """
    global _hook_installed
    if not _hook_installed:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hook_installed = True
    _engines.add(engine)


def registered_engines() -> list[AsyncEngine]:
    """The live engines registered in this process (``asyncpool.run`` disposes
    those its loops own at exit)."""
    return list(_engines)


def _after_fork_in_child() -> None:
    for engine in list(_engines):
        try:
            _drop_inherited(engine)
        except Exception:  # never let a fork hook break the child
            logger.exception("could not drop the connections inherited by %r", engine)


def _drop_inherited(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine
    pool = sync_engine.pool
    if isinstance(pool, FairAsyncPool):
        dropped = pool.drop_inherited()
        if dropped:
            logger.debug(
                "pool %r: dropped %d connections inherited from process %d",
                pool.name,
                dropped,
                os.getppid(),
            )
    _inherited.append(pool)
    # Replace the pool without closing the old one: close=False is the no-I/O form.
    sync_engine.dispose(close=False)


_engine_hooks.append(register_engine)
