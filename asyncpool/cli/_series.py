"""What one simulated run records: per-request outcomes and pool samples over time.

Plain dataclasses and arithmetic, no I/O: the driver fills them, the live
view, the summary table, the charts and ``--json`` read them.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..config import PoolConfig
from ._profile import Profile

__all__ = ["JSON_VERSION", "RequestRecord", "Run", "Sample", "Summary", "quantile", "to_json"]

#: Bumped when the layout of ``--json`` output changes incompatibly.
JSON_VERSION: Final = 1

#: Request outcomes.
SERVED: Final = "served"
TIMED_OUT: Final = "timed_out"
REJECTED: Final = "rejected"
ERROR: Final = "error"
UNFINISHED: Final = "unfinished"


@dataclass(slots=True)
class RequestRecord:
    """One request. Times are seconds from the start of the run."""

    arrival: float
    #: Seconds from asking for a connection to getting one (or giving up).
    wait: float | None = None
    #: Seconds the connection was held (served and failed-query requests).
    hold: float | None = None
    outcome: str = UNFINISHED


@dataclass(frozen=True, slots=True)
class Sample:
    """The pool and the traffic at one moment (windowed values cover the last second)."""

    t: float
    offered: float  # the profile's rate now, req/s
    arrival_rate: float  # requests that actually arrived in the last second
    checked_out: int
    idle: int
    overflow: int
    waiting: int
    size: int
    connects: int  # connections opened so far in this run (the pool's, background ones too)
    wait_p50: float | None  # over checkouts resolved in the last second
    wait_p99: float | None
    wait_max: float | None
    oldest_waiter: float  # seconds the longest-waiting request has waited so far
    served: int  # totals so far
    timed_out: int
    rejected: int
    errors: int
    in_flight: int


@dataclass(slots=True)
class Run:
    """One configuration driven through one profile."""

    label: str
    config: PoolConfig
    profile: Profile
    requests: list[RequestRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    first_error: str | None = None
    elapsed: float = 0.0


@dataclass(frozen=True, slots=True)
class Summary:
    """The numbers of the summary table."""

    requests: int
    served: int
    timed_out: int
    rejected: int
    errors: int
    unfinished: int
    wait_p50: float | None
    wait_p95: float | None
    wait_p99: float | None
    wait_max: float | None
    hold_mean: float | None
    peak_in_use: int
    peak_open: int
    connects: int
    open_at_end: int
    peak_waiting: int

    @classmethod
    def of(cls, run: Run) -> Summary:
        outcomes = Counter(r.outcome for r in run.requests)
        waits = sorted(r.wait for r in run.requests if r.wait is not None)
        holds = [r.hold for r in run.requests if r.hold is not None]
        return cls(
            requests=len(run.requests),
            served=outcomes[SERVED],
            timed_out=outcomes[TIMED_OUT],
            rejected=outcomes[REJECTED],
            errors=outcomes[ERROR],
            unfinished=outcomes[UNFINISHED],
            wait_p50=quantile(waits, 0.50),
            wait_p95=quantile(waits, 0.95),
            wait_p99=quantile(waits, 0.99),
            wait_max=waits[-1] if waits else None,
            hold_mean=sum(holds) / len(holds) if holds else None,
            peak_in_use=peak_in_use(run.requests),
            peak_open=max((s.size for s in run.samples), default=0),
            connects=run.samples[-1].connects if run.samples else 0,
            open_at_end=run.samples[-1].size if run.samples else 0,
            peak_waiting=max((s.waiting for s in run.samples), default=0),
        )


def quantile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile of an already sorted sequence; None when empty."""
    if not ordered:
        return None
    rank = max(math.ceil(q * len(ordered)), 1)
    return ordered[rank - 1]


def peak_in_use(requests: Sequence[RequestRecord]) -> int:
    """Most connections checked out at once, exactly, from each request's hold interval."""
    edges: list[tuple[float, int]] = []
    for r in requests:
        if r.wait is not None and r.hold is not None:
            got = r.arrival + r.wait
            edges.append((got, 1))
            edges.append((got + r.hold, -1))
    edges.sort(key=lambda e: (e[0], e[1]))  # a release at the same instant goes first
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


def to_json(runs: Sequence[Run], *, database: str) -> dict[str, Any]:
    """The raw series of every run, as written by ``--json``.

    Samples and requests are columns (one list per field), which loads
    straight into pandas or a spreadsheet and stays compact for long runs.
    """
    profile = runs[0].profile
    return {
        "version": JSON_VERSION,
        "database": database,
        "profile": {
            "phases": [dataclasses.asdict(p) for p in profile.phases],
            "hold": profile.hold,
            "sql": profile.sql,
            "arrivals": profile.arrivals,
            "seed": profile.seed,
            "duration": profile.duration,
        },
        "runs": [
            {
                "label": run.label,
                "config": dataclasses.asdict(run.config),
                "elapsed": run.elapsed,
                "summary": dataclasses.asdict(Summary.of(run)),
                "errors": dict(run.errors),
                "first_error": run.first_error,
                "samples": _columns(run.samples, [f.name for f in dataclasses.fields(Sample)]),
                "requests": _columns(
                    run.requests, [f.name for f in dataclasses.fields(RequestRecord)]
                ),
            }
            for run in runs
        ],
    }


def _columns(rows: Sequence[Any], names: Sequence[str]) -> dict[str, list[Any]]:
    return {name: [_rounded(getattr(row, name)) for row in rows] for name in names}


def _rounded(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value
