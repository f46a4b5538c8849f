"""Small statistics helpers shared by the benchmark scripts (no numpy needed)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of an already sorted sequence (nearest rank); NaN when empty."""
    if not ordered:
        return float("nan")
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        nan = float("nan")
        return {"median": nan, "min": nan, "max": nan}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite)}
