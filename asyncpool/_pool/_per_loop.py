"""A pool per live event loop behind one engine (``PoolConfig(pool_per_loop=True)``).

An engine's connections belong to one loop, so by default a second live loop
gets ``WrongEventLoopError``. Threaded servers and sync frameworks that run a
loop per thread (``asyncpool.run`` from several threads) want one engine
anyway: ``PerLoopPool`` keeps one ``FairAsyncPool`` per loop, each with the
engine's settings and touched only from its own loop's thread, and at most
``max_loops`` of them. The engine's numbers are their sum (one ``PoolState``:
settings, counters, observers); loop-scoped operations (a lifespan's drain,
``check_idle``) act on the calling loop's pool. A pool whose loop closed is
dropped without any I/O, the next time a loop joins or the numbers are read.

SQLAlchemy hands a checkout to ``_do_get``, which asks the calling loop's
pool; a connection goes back to the pool that made it (its record's own).
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, WrongEventLoopError
from ._fair import FairAsyncPool
from ._state import OwnerLoopClosed

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

    from ..config import PoolConfig
    from ._upkeep import Upkeep

__all__ = ["PerLoopPool"]


class PerLoopPool(FairAsyncPool):
    """One ``FairAsyncPool`` per live event loop, at most ``max_loops``."""

    def __init__(self, creator: Any, asyncpool_state: Any = None, **kw: Any) -> None:
        children = kw.pop("_children", None)
        super().__init__(creator, asyncpool_state, **kw)
        self._lock = threading.Lock()
        #: id(loop) -> (loop, its pool); replaced whole under the lock, read without it.
        self._children: dict[int, tuple[asyncio.AbstractEventLoop, FairAsyncPool]] = children or {}

    # ------------------------------------------------------------ the children

    def _child(self) -> FairAsyncPool:
        loop = asyncio.get_running_loop()
        entry = self._children.get(id(loop))
        if entry is not None and entry[0] is loop:
            return entry[1]
        with self._lock:
            self._prune()
            entry = self._children.get(id(loop))
            if entry is not None and entry[0] is loop:
                return entry[1]
            max_loops = self._state.config.max_loops
            if len(self._children) >= max_loops:
                raise WrongEventLoopError(
                    f"pool {self.name!r} already serves max_loops={max_loops} live event loops "
                    "(pool_per_loop=True); raise max_loops (the connection budget counts it) "
                    "or close loops you no longer use"
                )
            child = FairAsyncPool(self._creator, asyncpool_state=self._state, **self._child_kw())
            self._children = {**self._children, id(loop): (loop, child)}
        return child

    def _child_kw(self) -> dict[str, Any]:
        return {
            "pool_size": self._pool.maxsize,
            "max_overflow": self._max_overflow,
            "use_lifo": self._pool.use_lifo,
            "timeout": self._timeout,
            "recycle": self._recycle,
            "echo": self.echo,
            "logging_name": self._orig_logging_name,
            "reset_on_return": self._reset_on_return,
            "_dispatch": self.dispatch,
            "dialect": self._dialect,
        }

    def _prune(self) -> None:
        """Drop the pools of closed loops: their idle connections are let go
        of without touching the dead loop (the server ends their backends)."""
        dead = {key: pool for key, (loop, pool) in self._children.items() if loop.is_closed()}
        if not dead:
            return
        self._children = {k: v for k, v in self._children.items() if k not in dead}
        for pool in dead.values():
            pool.invalidate_idle(OwnerLoopClosed(f"pool {self.name!r}: a loop's pool closed"))
            pool.forget_dead_loop()

    def _current(self) -> FairAsyncPool | None:
        """The calling loop's pool, if it has one."""
        loop = asyncio._get_running_loop()
        entry = self._children.get(id(loop)) if loop is not None else None
        return entry[1] if entry is not None and entry[0] is loop else None

    def _pools(self) -> list[FairAsyncPool]:
        with self._lock:
            self._prune()
            return [pool for _, pool in self._children.values()]

    # ------------------------------------------------------- SQLAlchemy's hooks

    def _do_get(self) -> ConnectionPoolEntry:
        return self._child()._do_get()

    def recreate(self) -> PerLoopPool:
        """``engine.dispose()``: the calling loop's pool is replaced; the other
        live loops keep theirs (only their own threads may touch them)."""
        self.logger.info("Pool recreating")
        current = self._current()
        if current is not None:
            current.recreate()  # marks it replaced, stops its maintenance
        with self._lock:
            self._prune()
            kept = {k: v for k, v in self._children.items() if v[1] is not current}
        return PerLoopPool(
            self._creator, asyncpool_state=self._state, _children=kept, **self._child_kw()
        )

    def dispose(self) -> None:
        current = self._current()
        if current is not None:
            current.dispose()
        self._pools()  # drops closed loops' pools

    # ------------------------------------------------------------- read-outs

    def checkedout(self) -> int:
        return sum(max(pool.checkedout(), 0) for pool in self._pools())

    def live_idle(self) -> int:
        return sum(pool.live_idle() for pool in self._pools())

    @property
    def waiting(self) -> int:
        return sum(pool.waiting for pool in self._pools())

    @property
    def cleaning(self) -> int:
        return sum(pool.cleaning for pool in self._pools())

    @property
    def leak_timers_armed(self) -> int:
        return sum(pool.leak_timers_armed for pool in self._pools())

    @property
    def max_size(self) -> int | None:
        per_loop = super().max_size
        return None if per_loop is None else per_loop * self._state.config.max_loops

    def loop_count(self) -> int:
        return len(self._pools())

    def status(self) -> str:
        return f"Pool per loop: {len(self._children)} loops, {self.checkedout()} checked out"

    # ------------------------------------------- the calling loop's pool only

    @property
    def owner_loop(self) -> asyncio.AbstractEventLoop | None:
        current = self._current()
        return None if current is None else current.owner_loop

    @property
    def upkeep(self) -> Upkeep:
        return self._child().upkeep

    def invalidate_idle(self, exception: BaseException) -> int:
        current = self._current()
        return 0 if current is None else current.invalidate_idle(exception)

    def reject_waiters(self) -> int:
        current = self._current()
        return 0 if current is None else current.reject_waiters()

    def all_returned(self) -> asyncio.Event:
        current = self._current()
        if current is not None:
            return current.all_returned()
        done = asyncio.Event()
        done.set()
        return done

    def terminate_lent(self, reason: BaseException, *, idle: bool = False) -> int:
        current = self._current()
        return 0 if current is None else current.terminate_lent(reason, idle=idle)

    async def wait_cleaned(self) -> None:
        current = self._current()
        if current is not None:
            await current.wait_cleaned()

    def abort_cleanups(self) -> int:
        current = self._current()
        return 0 if current is None else current.abort_cleanups()

    def resize(self, config: PoolConfig) -> None:
        raise ConfigurationError(
            "resize",
            "pool_per_loop=True",
            "a pool of one loop: each loop's pool is sized "
            "by the engine's settings (create the engine with the size you want)",
        )

    def drop_inherited(self) -> int:
        """In a forked child: every loop's pool lets go, no I/O; none is kept."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        dropped = sum(pool.drop_inherited() for _, pool in self._children.values())
        self._children = {}
        return dropped
