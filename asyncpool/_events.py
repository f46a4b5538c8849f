"""Error handling: which errors leave a connection (or the whole pool) unusable.

SQLAlchemy's asyncpg dialect calls an error a disconnect only when the socket
is already closed. That misses the cases that take services down:

* a server that announced its shutdown (57P01/57P02/57P03) or a connection
  error class (08) while the socket still looks open;
* a statement that hit ``command_timeout``: asyncpg has sent a cancel request
  and the connection stays busy until the server answers it. Behind a black
  hole the answer never comes, and a rollback on return would wait for it
  forever. The connection's state is unknown, so it is invalidated (aborted,
  no round trip), as pgx and HikariCP do. (SQLAlchemy 2.1 does the same for a
  bare ``asyncio.TimeoutError``; this also covers a wrapped one.);
* 25006 (read-only transaction) when the server itself is read-only: the
  primary was demoted by a failover, so every pooled connection points at a
  replica now. That one connection is invalidated and so is the rest of the
  pool. A fresh connection tells (``_readonly``); a write inside the
  application's own ``READ ONLY`` transaction is left as the error it is.

The listener only marks errors; SQLAlchemy does the invalidation, and each one
lands in ``invalidations_by_reason`` through the pool's ``invalidate`` listener.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from sqlalchemy import event

from ._classify import classify, is_disconnect
from ._concurrent import raise_for_refusal
from ._readonly import server_is_read_only
from .errors import PoolClosedError

if TYPE_CHECKING:
    from sqlalchemy.engine import ExceptionContext
    from sqlalchemy.ext.asyncio import AsyncEngine

    from ._pool import FairAsyncPool

__all__ = ["install_error_handling"]

logger = logging.getLogger("asyncpool.pool")

#: Labels of errors after which this connection's state is unknown, though
#: the server and the other connections are fine.
_UNKNOWN_STATE: Final = frozenset({"timeout"})


def install_error_handling(engine: AsyncEngine) -> None:
    """Register the ``handle_error`` listener on ``engine`` (once per engine)."""
    sync_engine = engine.sync_engine
    if not event.contains(sync_engine, "handle_error", _on_error):
        event.listen(sync_engine, "handle_error", _on_error)


def _on_error(context: ExceptionContext) -> None:
    error = context.original_exception
    ended = _ended_by_shutdown(context)
    if ended is not None:
        raise PoolClosedError(ended) from error
    if not isinstance(error, Exception):
        return  # a cancellation: SQLAlchemy already invalidates this connection alone
    pool = _pool_of(context)
    if pool is not None and pool.driver.refused_as_busy(error):
        raise_for_refusal(context, pool)
    label = classify(error)
    if label in _UNKNOWN_STATE:
        context.is_disconnect = True
        context.invalidate_pool_on_disconnect = False
        return
    if label == "read_only_transaction":
        _on_read_only(context, error)
        return
    if not (context.is_disconnect or is_disconnect(error)):
        return
    context.is_disconnect = True
    # SQLAlchemy's default reconnects every pooled connection after any
    # disconnect. With the pre-ping on, one dead backend (a killed pid) does
    # not condemn the others: the ping finds any other dead one unseen.
    context.invalidate_pool_on_disconnect = pool is None or not pool.state.config.pre_ping


def _on_read_only(context: ExceptionContext, error: Exception) -> None:
    """25006: condemn the pool only if the server is read-only, not just this transaction."""
    pool = _pool_of(context)
    if pool is None:
        return
    config = pool.state.config
    # Bounded as a checkout is at worst: a connect, then one round trip.
    timeout = config.connect_timeout + config.pre_ping_timeout
    read_only = server_is_read_only(pool, context.dialect, timeout)
    if read_only is None:
        logger.warning(
            "pool %r: read_only_transaction (SQLSTATE 25006), and whether the server is "
            "read-only could not be told (asked for at most %g s); the pool is left as it is",
            pool.name,
            timeout,
        )
    if not read_only:
        return  # a write in the application's own READ ONLY transaction
    context.is_disconnect = True
    context.invalidate_pool_on_disconnect = True
    dropped = pool.invalidate_idle(error)
    logger.warning(
        "pool %r: read_only_transaction (SQLSTATE 25006) and a fresh connection is read-only "
        "too: presumably a demoted primary; invalidated the whole pool (%d idle connections "
        "closed)",
        pool.name,
        dropped,
    )


def _ended_by_shutdown(context: ExceptionContext) -> str | None:
    """Why a drain ended this connection under its holder, if it did."""
    from ._pool._state import ended_by_shutdown

    if not ended_by_shutdown:
        return None
    fairy = getattr(context.connection, "_dbapi_connection", None)
    driver = getattr(getattr(fairy, "dbapi_connection", None), "driver_connection", None)
    try:
        return ended_by_shutdown.get(driver) if driver is not None else None
    except TypeError:
        return None


def _pool_of(context: ExceptionContext) -> FairAsyncPool | None:
    from ._pool import FairAsyncPool  # local: _pool imports nothing from here

    engine = context.engine
    pool = getattr(engine, "pool", None)
    return pool if isinstance(pool, FairAsyncPool) else None
