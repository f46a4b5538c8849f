"""Event loops: a pool belongs to the loop that first used it.

A connection is bound to its loop's transport. An owner loop that is still
open is protected (``WrongEventLoopError``); one that is closed
(``asyncio.run()`` per job, a test's loop) is let go of without touching it:
its idle connections are dropped without awaiting anything, which also frees
their server backends, and connections lent under it are dropped when they
come back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..errors import WrongEventLoopError
from ._state import OwnerLoopClosed

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

    from ._fair import FairAsyncPool

__all__ = ["adopt_running_loop", "drop_if_foreign"]

logger = logging.getLogger("asyncpool.pool")


def adopt_running_loop(pool: FairAsyncPool) -> asyncio.AbstractEventLoop:
    """Make the running loop the pool's owner, if the old owner is closed."""
    running = asyncio.get_running_loop()
    owner = pool.owner_loop
    if owner is not None and not owner.is_closed():
        raise WrongEventLoopError(
            f"pool {pool.name!r} belongs to another event loop, which is still open; "
            "an engine cannot be shared between event loops: create one engine per loop, "
            "or `await engine.dispose()` in the owning loop and close it first"
        )
    if owner is not None:
        # The empty records keep their slots and reconnect on checkout.
        dropped = pool.invalidate_idle(OwnerLoopClosed(f"pool {pool.name!r}: owner loop closed"))
        pool.forget_dead_loop()
        logger.info(
            "pool %r: owner event loop closed; dropped %d idle connections", pool.name, dropped
        )
    return running


def drop_if_foreign(pool: FairAsyncPool, record: ConnectionPoolEntry) -> None:
    """A connection checked out under a dead loop came back: drop it."""
    dbapi_connection = record.dbapi_connection
    if dbapi_connection is not None:
        loop = pool.driver.loop_of(dbapi_connection.driver_connection)
        if loop is not None and loop is not pool.owner_loop:
            record.invalidate(OwnerLoopClosed(f"pool {pool.name!r}: owner loop closed"))
