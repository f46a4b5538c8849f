"""statistics(engine): a frozen snapshot of one pool.

Nothing is computed until somebody asks: the pool only bumps plain integer
counters as it works, and this module reads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .engine import pool_of

__all__ = ["PoolStatistics", "statistics"]


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """One pool at one moment. Gauges are current values; counters only grow.

    Gauges (connections unless stated):

    - ``name``: the pool's name (also its ``application_name`` by default).
    - ``size``: connections open now, checked out plus idle.
    - ``max_size``: the most it may open, ``pool_size + max_overflow``;
      ``None`` for a pool without overflow limit (``max_overflow=-1``).
    - ``checked_out``: connections lent to callers now.
    - ``idle``: open connections waiting in the pool now.
    - ``overflow``: connections open above ``pool_size`` now.
    - ``waiting``: callers queued for a connection now (requests).
    - ``loops``: live event loops served (each its own pool with
      ``pool_per_loop``; else 1 once a loop owns the pool).
    - ``cleaning``: connections being put in order after their caller gave up
      or gave them back unclean (statement cancelled on the server, rolled
      back); each keeps its slot and counts in ``checked_out`` until done.

    Counters since the engine was created:

    - ``checkouts``: connections handed out.
    - ``waits``: checkouts that had to queue (requests).
    - ``wait_seconds_total`` / ``wait_seconds_max``: time spent queueing,
      summed and the longest single wait (seconds; timed-out waits included).
    - ``timeouts``: checkouts that gave up after ``pool_timeout``.
    - ``rejected``: checkouts refused at once by ``max_waiting``.
    - ``connects`` / ``connect_errors``: new connections opened / failed.
    - ``pre_pings``: pre-pings sent (checkouts outside the skip window).
    - ``pre_ping_failures``: connections found dead by the pre-ping and replaced.
    - ``invalidations``: connections discarded as unusable, for any reason.
    - ``recycles``: connections replaced for age (``pool_recycle``).
    - ``leaks_detected``: checkouts held past ``leak_threshold``.
    - ``cleanups`` / ``cleanups_reused``: connections put in order / of those,
      clean again and back in the pool (the rest were closed).
    - ``cleanup_timeouts``: cleanups that took over ``cleanup_timeout`` and
      aborted their connection.

    The maintenance task's (in the background, no checkout pays for it):

    - ``refills`` / ``refill_failures``: connections opened to keep
      ``min_idle`` / attempts that failed (spaced by backoff).
    - ``outages``: times the refill found the database unreachable.
    - ``idle_closes``: connections above the floor closed after ``idle_timeout``.
    - ``background_recycles``: connections replaced at the end of their
      lifetime (also counted in ``recycles``).
    - ``keepalive_pings`` / ``keepalive_failures``: idle connections pinged
      after ``keepalive_interval`` / found dead and replaced.
    - ``invalidations_by_reason``: ``invalidations`` by reason (``pre_ping``,
      ``idle_dead``, ``keepalive``, ``cancelled``, a SQLSTATE class, ...).
    """

    name: str
    size: int
    max_size: int | None
    checked_out: int
    idle: int
    overflow: int
    waiting: int
    loops: int
    cleaning: int
    checkouts: int
    waits: int
    wait_seconds_total: float
    wait_seconds_max: float
    timeouts: int
    rejected: int
    connects: int
    connect_errors: int
    pre_pings: int
    pre_ping_failures: int
    invalidations: int
    recycles: int
    leaks_detected: int
    cleanups: int
    cleanups_reused: int
    cleanup_timeouts: int
    refills: int
    refill_failures: int
    outages: int
    idle_closes: int
    background_recycles: int
    keepalive_pings: int
    keepalive_failures: int
    invalidations_by_reason: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def statistics(engine: Any) -> PoolStatistics:
    """Snapshot of the pool behind an engine made by ``create_pooled_engine``."""
    pool = pool_of(engine)
    config = pool.state.config
    counters = pool.state.counters
    checked_out = max(pool.checkedout(), 0)
    idle = pool.live_idle()
    size = checked_out + idle
    return PoolStatistics(
        name=pool.name,
        size=size,
        max_size=pool.max_size,
        checked_out=checked_out,
        idle=idle,
        overflow=max(size - config.pool_size, 0),
        waiting=pool.waiting,
        loops=pool.loop_count(),
        cleaning=pool.cleaning,
        checkouts=counters.checkouts,
        waits=counters.waits,
        wait_seconds_total=counters.wait_seconds_total,
        wait_seconds_max=counters.wait_seconds_max,
        timeouts=counters.timeouts,
        rejected=counters.rejected,
        connects=counters.connects,
        connect_errors=counters.connect_errors,
        pre_pings=counters.pre_pings,
        pre_ping_failures=counters.pre_ping_failures,
        invalidations=counters.invalidations,
        recycles=counters.recycles,
        leaks_detected=counters.leaks_detected,
        cleanups=counters.cleanups,
        cleanups_reused=counters.cleanups_reused,
        cleanup_timeouts=counters.cleanup_timeouts,
        refills=counters.refills,
        refill_failures=counters.refill_failures,
        outages=counters.outages,
        idle_closes=counters.idle_closes,
        background_recycles=counters.background_recycles,
        keepalive_pings=counters.keepalive_pings,
        keepalive_failures=counters.keepalive_failures,
        invalidations_by_reason=dict(counters.invalidations_by_reason),
    )
