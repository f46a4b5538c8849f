"""Traffic profiles: a steady rate, a spike, a steady rate again.

Arrivals are open-loop: each request arrives at its scheduled time whether or
not earlier ones have finished, as real users do. A closed loop (N workers
that each wait for their previous request) slows down when the pool does and
so never shows the pile-up that makes a spike hurt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

__all__ = ["ARRIVALS", "Phase", "Profile"]

#: ``poisson``: random gaps with the phase's mean rate (what independent users
#: produce); ``even``: exactly 1/rate apart.
ARRIVALS: Final = ("poisson", "even")


@dataclass(frozen=True, slots=True)
class Phase:
    """``rate`` requests per second for ``seconds``."""

    name: str
    rate: float
    seconds: float


@dataclass(frozen=True, slots=True)
class Profile:
    """What the simulated service receives and what each request does.

    Each request checks a connection out and holds it for ``SELECT
    pg_sleep(hold)``, or for ``sql`` when given.
    """

    phases: tuple[Phase, ...]
    hold: float = 0.1
    sql: str | None = None
    arrivals: str = "poisson"
    seed: int = 1

    @classmethod
    def spike(
        cls,
        *,
        rate: float,
        before: float,
        spike_rate: float,
        spike: float,
        after: float,
        hold: float = 0.1,
        sql: str | None = None,
        arrivals: str = "poisson",
        seed: int = 1,
    ) -> Profile:
        phases = (
            Phase("steady", rate, before),
            Phase("spike", spike_rate, spike),
            Phase("after", rate, after),
        )
        return cls(tuple(p for p in phases if p.seconds > 0), hold, sql, arrivals, seed)

    @property
    def duration(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def peak_rate(self) -> float:
        return max((p.rate for p in self.phases), default=0.0)

    def phase_at(self, t: float) -> Phase | None:
        """The phase running at ``t`` seconds from the start; None after the end."""
        end = 0.0
        for phase in self.phases:
            end += phase.seconds
            if t < end:
                return phase
        return None

    def rate_at(self, t: float) -> float:
        phase = self.phase_at(t)
        return phase.rate if phase else 0.0

    def arrival_times(self) -> list[float]:
        """Seconds from the start at which requests arrive; the same for the same seed."""
        rng = random.Random(self.seed)
        times: list[float] = []
        start = 0.0
        for phase in self.phases:
            end = start + phase.seconds
            if phase.rate > 0:
                if self.arrivals == "even":
                    gap = 1.0 / phase.rate
                    t = start + gap / 2
                    while t < end:
                        times.append(t)
                        t += gap
                else:
                    t = start + rng.expovariate(phase.rate)
                    while t < end:
                        times.append(t)
                        t += rng.expovariate(phase.rate)
            start = end
        return times

    def work(self) -> str:
        """What a request does while it holds the connection, for headers."""
        return self.sql if self.sql is not None else f"SELECT pg_sleep({self.hold:g})"

    def describe(self) -> str:
        parts = [f"{p.rate:g} req/s for {p.seconds:g} s" for p in self.phases]
        return ", then ".join(parts) + f" ({self.arrivals} arrivals); each request: {self.work()}"
