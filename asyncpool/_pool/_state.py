"""What one engine's pools share, and the vocabulary of why connections go.

``engine.dispose()`` replaces the pool object; the ``PoolState`` (config,
name, counters, observers) carries over to the new one, so ``statistics()``
and telemetry see one pool per engine.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from ..config import PoolConfig

__all__ = [
    "CleanupFailed",
    "IdleDropped",
    "OwnerLoopClosed",
    "PoolCounters",
    "PoolObserver",
    "PoolState",
    "PrePingFailed",
    "ReturnedUnclean",
    "invalidation_reason",
    "next_pool_name",
]

_names: Iterator[int] = itertools.count(1)

#: Driver connections a shutdown ended while still checked out, and why: the
#: holder's next error (its exit's rollback included) says so, not "closed".
ended_by_shutdown: Final[weakref.WeakKeyDictionary[Any, str]] = weakref.WeakKeyDictionary()


def next_pool_name() -> str:
    """``pool-N``: the name of a pool whose config gives none."""
    return f"pool-{next(_names)}"


class PrePingFailed(Exception):
    """Why a connection was replaced at checkout (the driver's error is chained)."""


class OwnerLoopClosed(Exception):
    """The connection belonged to an event loop that has been closed."""


class ReturnedUnclean(Exception):
    """A connection came back in a state the pool cannot hand out as it is.

    ``reason`` is the label counted in ``invalidations_by_reason``.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class IdleDropped(ReturnedUnclean):
    """The maintenance task found an idle connection dead (``idle_dead``: the
    driver saw it end; ``keepalive``: it failed its ping) and replaced it."""


class CleanupFailed(Exception):
    """A connection could not be put back in order (or not in time) and was closed.

    ``counted``: its invalidation was already counted, under the reason it
    came back unclean for.
    """

    def __init__(self, message: str, *, counted: bool = False) -> None:
        super().__init__(message)
        self.counted = counted


#: Invalidation labels after which other idle connections may be dead too.
_DISCONNECT_REASONS: Final = frozenset(
    {
        "admin_shutdown",
        "crash_shutdown",
        "cannot_connect_now",
        "connection_exception",
        "connection_closed",
        "protocol_error",
        "returned_closed",
        "idle_dead",
        "keepalive",
    }
)


class PoolObserver(Protocol):
    """What telemetry hears from the pool. Every method must be cheap and never raise."""

    def checked_out(self, wait: float, waited: bool, ping_error: BaseException | None) -> None: ...

    def checkout_failed(self, wait: float, error: BaseException) -> None: ...

    def checked_in(self, use: float) -> None: ...

    def connected(self, seconds: float, error: BaseException | None) -> None: ...

    def invalidated(self, reason: str) -> None: ...


@dataclass(slots=True)
class PoolCounters:
    """Monotonic counters; plain ints bumped inline, read by ``statistics()``."""

    checkouts: int = 0
    pre_pings: int = 0
    waits: int = 0
    wait_seconds_total: float = 0.0
    wait_seconds_max: float = 0.0
    timeouts: int = 0
    rejected: int = 0
    connects: int = 0
    connect_errors: int = 0
    pre_ping_failures: int = 0
    invalidations: int = 0
    recycles: int = 0
    leaks_detected: int = 0
    cleanups: int = 0
    cleanups_reused: int = 0
    cleanup_timeouts: int = 0
    refills: int = 0
    refill_failures: int = 0
    outages: int = 0
    idle_closes: int = 0
    background_recycles: int = 0
    keepalive_pings: int = 0
    keepalive_failures: int = 0
    invalidations_by_reason: collections.Counter[str] = field(default_factory=collections.Counter)


class PoolState:
    """What one engine's pools share across ``engine.dispose()`` (which recreates the pool)."""

    __slots__ = (
        "__weakref__",
        "_last_invalidation",
        "closed",
        "config",
        "counters",
        "doubt_since",
        "name",
        "observers",
    )

    def __init__(self, config: PoolConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.counters = PoolCounters()
        self.observers: tuple[PoolObserver, ...] = ()
        self.closed = False
        #: ``time.monotonic()`` of the last disconnect seen: connections parked
        #: before it are pinged at checkout even inside the skip window.
        self.doubt_since = 0.0
        #: (DBAPI connection, exception) of the invalidation under way: the
        #: pool's close, which SQLAlchemy calls right after, decides by it.
        self._last_invalidation: tuple[Any, BaseException | None] | None = None

    def add_observer(self, observer: PoolObserver) -> None:
        self.observers = (*self.observers, observer)

    def remove_observer(self, observer: PoolObserver) -> None:
        self.observers = tuple(o for o in self.observers if o is not observer)

    def on_invalidate(
        self, dbapi_connection: Any, record: Any, exception: BaseException | None
    ) -> None:
        """``PoolEvents.invalidate`` listener: every invalidation, whoever caused it."""
        self._last_invalidation = (dbapi_connection, exception)
        if isinstance(exception, CleanupFailed) and exception.counted:
            return  # counted when the connection came back unclean
        self.count_invalidation(invalidation_reason(exception))

    def invalidated_by(self, dbapi_connection: Any) -> BaseException | None:
        """Why ``dbapi_connection`` is being invalidated (None if not known)."""
        last, self._last_invalidation = self._last_invalidation, None
        if last is not None and last[0] is dbapi_connection:
            return last[1]
        return None

    def count_invalidation(self, reason: str) -> None:
        self.counters.invalidations += 1
        self.counters.invalidations_by_reason[reason] += 1
        if reason in _DISCONNECT_REASONS:
            self.doubt_since = time.monotonic()
        for observer in self.observers:
            observer.invalidated(reason)


def invalidation_reason(exception: BaseException | None) -> str:
    """A short, stable label for why a connection was invalidated."""
    if exception is None:
        return "explicit"
    if isinstance(exception, PrePingFailed):
        return "pre_ping"
    if isinstance(exception, OwnerLoopClosed):
        return "loop_closed"
    if isinstance(exception, ReturnedUnclean):
        return exception.reason
    if isinstance(exception, CleanupFailed):
        return "cleanup_failed"
    if isinstance(exception, asyncio.CancelledError):
        return "cancelled"
    from .._classify import classify  # local: keeps the hot import graph small

    return classify(exception)
