"""Pool sizing arithmetic: Little's law, burst headroom, the fleet budget.

Pure functions, so every number ``asyncpool advise`` prints can be checked by
hand and by a unit test. Each step appends the line it computed to
``Advice.steps``; the command prints those lines as "the arithmetic".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from ..config import MAX_OVERFLOW_MAX, MAX_WAITING_MAX, POOL_SIZE_MAX
from ..errors import ConfigurationError
from ._args import range_text

__all__ = ["LIMITS", "Advice", "Target", "advise"]

#: The range of each ``Target`` number, as (low, high, low excluded). The
#: command's flags take the same ranges, so a value the arithmetic cannot use
#: is a usage error naming the flag, never an ``OverflowError`` or advice
#: ``PoolConfig`` would refuse.
LIMITS: Final[dict[str, tuple[float, float, bool]]] = {
    "peak_rps": (0.0, 10_000_000.0, True),  # fleet-wide requests per second
    "peak_concurrent": (0.0, 10_000_000.0, True),
    "hold": (0.00001, 3600.0, False),  # 10 us (a round trip) to an hour
    "processes": (1, 100_000, False),
    "request_timeout": (0.001, 86_400.0, False),  # 1 ms to a day
    "reserve": (0, 262_143, False),  # PostgreSQL's most backends, 2^18 - 1
    "spindles": (0, 100_000, False),
    "cores": (1, 100_000, False),
    "max_connections": (1, 262_143, False),
    "reserved_slots": (0, 262_143, False),
    "in_use": (0, 262_143, False),
}

#: Standard deviations of headroom above the mean number of busy connections.
#: With Poisson arrivals the number busy at a moment is Poisson-distributed
#: (M/G/inf), so it strays from its mean m by about sqrt(m); three of those
#: cover about 99.9 % of moments.
BURST_SIGMAS: Final = 3.0


@dataclass(frozen=True, slots=True)
class Target:
    """The load to size for, and what is known about the server."""

    hold: float  # average seconds a request keeps its connection
    processes: int = 1  # app processes in the fleet (workers x pods)
    peak_rps: float | None = None  # fleet-wide requests per second at peak
    peak_concurrent: float | None = None  # fleet-wide requests holding a connection at peak
    request_timeout: float = 10.0  # the caller's deadline (load balancer, client)
    reserve: int = 5  # connections to leave free for admin, migrations, cron
    spindles: int = 1  # HikariCP's "effective spindle count"
    cores: int | None = None  # the server's CPU cores
    max_connections: int | None = None
    reserved_slots: int = 0  # superuser_reserved_connections + reserved_connections
    in_use: int | None = None  # client connections open on the server now


@dataclass(slots=True)
class Advice:
    """Per-process settings, with the reasoning that produced them."""

    pool_size: int = 1
    max_overflow: int = 0
    pool_timeout: float = 5.0
    max_waiting: int = 0
    busy: float = 0.0  # connections the fleet keeps busy on average at peak
    fleet_max: int = 0
    server_budget: int | None = None
    hikari_connections: int | None = None
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def max_size(self) -> int:
        return self.pool_size + self.max_overflow

    def settings(self) -> dict[str, float | int]:
        return {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_timeout": self.pool_timeout,
            "max_waiting": self.max_waiting,
        }


def advise(target: Target) -> Advice:
    """Per-process ``pool_size``, ``max_overflow``, ``pool_timeout`` and ``max_waiting``."""
    _check(target)
    advice = Advice()
    step = advice.steps.append
    procs = target.processes

    if target.peak_rps is not None:
        busy = target.peak_rps * target.hold
        step(
            f"Little's law: connections busy at peak = arrival rate x hold time = "
            f"{target.peak_rps:g} req/s x {target.hold:g} s = {busy:.1f} (whole fleet)"
        )
    else:
        busy = float(target.peak_concurrent or 0.0)
        step(f"connections busy at peak = {busy:g} concurrent requests (whole fleet, given)")
    advice.busy = busy
    per_proc = busy / procs
    step(f"per process: {busy:.1f} / {procs} process(es) = {per_proc:.2f} busy on average")
    burst = per_proc + BURST_SIGMAS * math.sqrt(per_proc)
    step(
        f"burst headroom (random arrivals; ~99.9 % of moments): {per_proc:.2f} + "
        f"{BURST_SIGMAS:g} x sqrt({per_proc:.2f}) = {burst:.1f}"
    )
    advice.pool_size = max(math.ceil(per_proc), 1)
    max_size = max(math.ceil(burst), advice.pool_size)
    advice.max_overflow = max_size - advice.pool_size
    step(
        f"pool_size = ceil({per_proc:.2f}) = {advice.pool_size} (kept open); "
        f"max_overflow = ceil({burst:.1f}) - {advice.pool_size} = {advice.max_overflow} "
        "(opened for bursts, closed after)"
    )
    advice.pool_size = _clamp(advice, "pool_size", advice.pool_size, POOL_SIZE_MAX)
    advice.max_overflow = _clamp(advice, "max_overflow", advice.max_overflow, MAX_OVERFLOW_MAX)

    if target.cores is not None:
        advice.hikari_connections = target.cores * 2 + target.spindles
        step(
            f"HikariCP rule of thumb: connections = cores x 2 + effective spindles = "
            f"{target.cores} x 2 + {target.spindles} = {advice.hikari_connections} "
            "working at once for the whole server"
        )
        if busy > advice.hikari_connections:
            advice.warnings.append(
                f"the fleet keeps {busy:.0f} connections busy at peak, more than the "
                f"{advice.hikari_connections} the server can work on at once by HikariCP's rule: "
                "if the hold time is database CPU, queries slow each other down and a smaller "
                "pool with a queue serves faster; if it is waiting (I/O, locks, app code in a "
                "transaction), the rule does not bound you"
            )

    advice.pool_timeout = _round_seconds(target.request_timeout / 2)
    step(
        f"pool_timeout = request deadline / 2 = {target.request_timeout:g} s / 2 = "
        f"{advice.pool_timeout:g} s (a request that waited that long still has the other "
        "half for its query and response)"
    )
    if target.hold >= advice.pool_timeout:
        advice.warnings.append(
            f"a request holds its connection {target.hold:g} s, as long as pool_timeout "
            f"({advice.pool_timeout:g} s): the request deadline leaves no room to queue"
        )

    throughput = advice.max_size / target.hold
    advice.max_waiting = max(math.floor(throughput * advice.pool_timeout), 1)
    step(
        f"max_waiting = throughput x pool_timeout = ({advice.max_size} connections / "
        f"{target.hold:g} s) x {advice.pool_timeout:g} s = {throughput:.0f} req/s x "
        f"{advice.pool_timeout:g} s = {advice.max_waiting} (a longer queue cannot be served "
        "within pool_timeout: refuse at once instead of failing late)"
    )
    advice.max_waiting = _clamp(advice, "max_waiting", advice.max_waiting, MAX_WAITING_MAX)

    _fleet(target, advice)
    return advice


def _fleet(target: Target, advice: Advice) -> None:
    step = advice.steps.append
    procs = target.processes
    advice.fleet_max = procs * advice.max_size
    step(
        f"fleet at most: {procs} process(es) x ({advice.pool_size} + {advice.max_overflow}) = "
        f"{advice.fleet_max} connections"
    )
    if target.max_connections is None:
        return
    budget = target.max_connections - target.reserved_slots - target.reserve
    advice.server_budget = budget
    step(
        f"server budget: max_connections {target.max_connections} - reserved "
        f"{target.reserved_slots} - kept free for admin {target.reserve} = {budget}"
    )
    if budget < procs:
        advice.warnings.append(
            f"the server allows {budget} connections for {procs} processes: fewer than one each; "
            "put a pooler (PgBouncer) in front, or raise max_connections"
        )
        advice.pool_size, advice.max_overflow = 1, 0
        advice.fleet_max = procs
        return
    if advice.fleet_max > budget:
        cap = budget // procs
        advice.warnings.append(
            f"the fleet could open {advice.fleet_max} connections, more than the server's "
            f"{budget}: capped at {budget} // {procs} = {cap} per process (peaks will queue; "
            "consider fewer processes, a larger max_connections or PgBouncer)"
        )
        advice.pool_size = min(advice.pool_size, cap)
        advice.max_overflow = cap - advice.pool_size
        advice.fleet_max = procs * cap
        throughput = advice.max_size / target.hold
        advice.max_waiting = min(
            max(math.floor(throughput * advice.pool_timeout), 1), MAX_WAITING_MAX
        )
        step(
            f"capped: pool_size = {advice.pool_size}, max_overflow = {advice.max_overflow}, "
            f"max_waiting = {advice.max_waiting}; fleet {advice.fleet_max} <= {budget}"
        )
        if advice.fleet_max < advice.busy:
            advice.warnings.append(
                f"capped, the fleet has {advice.fleet_max} connections for the "
                f"{advice.busy:.0f} the peak keeps busy: it cannot keep up, and requests will "
                "queue until they time out; shorten the hold time, add a pooler or a bigger server"
            )
    else:
        step(f"fits: {advice.fleet_max} <= {budget}")
    if target.in_use is not None and advice.fleet_max > budget - target.in_use:
        advice.warnings.append(
            f"{target.in_use} connections are open on the server now, leaving "
            f"{max(budget - target.in_use, 0)}: the fleet's {advice.fleet_max} fit beside them "
            "only if some of those are this app's own"
        )


def _clamp(advice: Advice, setting: str, value: int, high: int) -> int:
    """``value``, or ``PoolConfig``'s limit for ``setting`` with a note when past it."""
    if value <= high:
        return value
    advice.steps.append(f"{setting} = {value} is past PoolConfig's limit: clamped to {high}")
    advice.warnings.append(
        f"the arithmetic asks for {setting} = {value}, more than PoolConfig allows ({high}): "
        f"clamped to {high}; spread the load over more processes, shorten the hold time "
        "or put a pooler (PgBouncer) in front"
    )
    return high


def _check(target: Target) -> None:
    if (target.peak_rps is None) == (target.peak_concurrent is None):
        raise ConfigurationError(
            "peak_rps", target.peak_rps, "a number when peak_concurrent is None, else None"
        )
    for name, (low, high, low_excluded) in LIMITS.items():
        value = getattr(target, name)
        if value is None and name not in ("hold", "processes", "request_timeout"):
            continue
        kind = int if isinstance(low, int) else float
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (kind is float or isinstance(value, int))
            and math.isfinite(value)
            and (value > low if low_excluded else value >= low)
            and value <= high
        )
        if not ok:
            raise ConfigurationError(
                name, value, range_text(kind, low, high, low_excluded=low_excluded)
            )


def _round_seconds(value: float) -> float:
    """Seconds rounded for people to read, never to 0 (``PoolConfig`` wants > 0)."""
    if value >= 10:
        return float(round(value))
    if value >= 0.1:
        return round(value, 1)
    return float(f"{value:.2g}")
