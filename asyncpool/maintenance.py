"""Maintenance on demand: ``check_idle(engine)`` and ``resize(engine, ...)``.

The pool keeps itself healthy in the background (``min_idle``,
``idle_timeout``, ``pool_recycle`` with ``recycle_jitter``,
``keepalive_interval``); these are for the moments an application knows
better: after a network change, check the idle connections now (psycopg's
``check()``); under a new budget, change the pool's size without a restart.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._pool import _loops
from .config import PoolConfig
from .engine import pool_of

__all__ = ["check_idle", "resize"]


async def check_idle(engine: Any) -> int:
    """Ping every idle connection of ``engine``'s pool now and replace the dead
    ones; returns how many were replaced. Runs on the pool's event loop (the
    running one becomes its owner if it has none, as a checkout would)."""
    pool = pool_of(engine)
    if pool.owner_loop is not asyncio.get_running_loop():
        _loops.adopt_running_loop(pool)  # WrongEventLoopError if another loop owns it
        return 0  # a new owner: the old loop's idle connections were just dropped
    return await pool.upkeep.check_idle()


def resize(
    engine: Any, *, pool_size: int | None = None, max_overflow: int | None = None
) -> PoolConfig:
    """Change ``pool_size`` and/or ``max_overflow`` at run time; returns the new
    config. Validated like ``PoolConfig`` (``ConfigurationError`` names the
    setting and its range) before anything changes. Growing hands the new
    slots to waiting callers at once; shrinking closes idle connections above
    the new bound now and lent ones as they come back. Call it from the
    pool's event loop (or before the pool was first used)."""
    pool = pool_of(engine)
    changes: dict[str, int] = {}
    if pool_size is not None:
        changes["pool_size"] = pool_size
    if max_overflow is not None:
        changes["max_overflow"] = max_overflow
    config = pool.state.config.replace(**changes)
    owner = pool.owner_loop
    if owner is not None and not owner.is_closed() and asyncio._get_running_loop() is not owner:
        from .errors import WrongEventLoopError

        raise WrongEventLoopError(
            f"resize() of pool {pool.name!r} must run on the event loop that owns the pool"
        )
    pool.resize(config)
    return config
