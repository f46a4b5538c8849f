"""Leak detection: warn, with the checkout stack, when a connection is held too long."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import TYPE_CHECKING

import greenlet

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

    from ._state import PoolState

__all__ = ["LeakWatch"]

logger = logging.getLogger("asyncpool.pool")


class LeakWatch:
    """One timer per lent connection, armed at checkout, cancelled at give-back."""

    __slots__ = ("_state", "_threshold", "_timers")

    def __init__(self, state: PoolState, threshold: float) -> None:
        self._state = state
        self._threshold = threshold
        self._timers: dict[ConnectionPoolEntry, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._timers)

    def start(self, loop: asyncio.AbstractEventLoop, rec: ConnectionPoolEntry) -> None:
        self._timers[rec] = loop.call_later(
            self._threshold, self._report, rec, _caller_stack(), time.perf_counter()
        )

    def stop(self, rec: ConnectionPoolEntry) -> None:
        timer = self._timers.pop(rec, None)
        if timer is not None:
            timer.cancel()
        since = rec.__dict__.pop("_ap_leak_reported", None)
        if since is not None:
            logger.warning(
                "pool %r: the connection reported as leaked was returned after %.1f s; "
                "leak warning cleared",
                self._state.name,
                time.perf_counter() - since,
            )

    def _report(self, rec: ConnectionPoolEntry, stack: str, since: float) -> None:
        self._state.counters.leaks_detected += 1
        rec._ap_leak_reported = since  # type: ignore[attr-defined]
        logger.warning(
            "pool %r: connection leak suspected: checked out %.1f s ago and not returned "
            "(leak_threshold=%g s). It was checked out at:\n%s",
            self._state.name,
            time.perf_counter() - since,
            self._threshold,
            stack,
        )


def _caller_stack() -> str:
    """The stack that checked the connection out, across SQLAlchemy's greenlet bridge."""
    frames = list(traceback.extract_stack())
    parent = greenlet.getcurrent().parent
    if parent is not None and parent.gr_frame is not None:
        frames = list(traceback.extract_stack(parent.gr_frame)) + frames
    # The event loop's own frames say nothing about who leaked: drop them,
    # so the frames kept are the caller's.
    noise = ("/sqlalchemy/", "/asyncpool/_pool", "/asyncio/")
    keep = [f for f in frames if not any(part in f.filename for part in noise)]
    return "".join(traceback.format_list(keep[-12:])).rstrip()
