"""The pool, split by responsibility.

* ``_fair``: ``FairAsyncPool``, SQLAlchemy's hooks, checkout and hand-off;
* ``_cleanup``: give-back hygiene, server-side cancel, slots held until done;
* ``_loops``: loop ownership, dropping a dead loop's connections;
* ``_per_loop``: ``PerLoopPool``, a pool per live loop (``pool_per_loop``);
* ``_upkeep``: the maintenance task (min_idle, idle_timeout, recycle, keepalive);
* ``_leaks``: leak detection;
* ``_state``: what an engine's pools share (config, counters, observers).
"""

from ._fair import FairAsyncPool as FairAsyncPool
from ._per_loop import PerLoopPool as PerLoopPool
from ._state import OwnerLoopClosed as OwnerLoopClosed
from ._state import PoolCounters as PoolCounters
from ._state import PoolObserver as PoolObserver
from ._state import PoolState as PoolState
from ._state import PrePingFailed as PrePingFailed
from ._state import invalidation_reason as invalidation_reason
from ._state import next_pool_name as next_pool_name

__all__ = [
    "FairAsyncPool",
    "OwnerLoopClosed",
    "PerLoopPool",
    "PoolCounters",
    "PoolObserver",
    "PoolState",
    "PrePingFailed",
    "invalidation_reason",
    "next_pool_name",
]
