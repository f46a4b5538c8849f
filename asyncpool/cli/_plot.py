"""Charts of a simulation over time: ``.png`` with matplotlib, ``.html`` with plotly.

Four rows share the time axis, one column per configuration: the load
(offered, arrived, timed out per second), connections (in use and open, with
``pool_size`` and ``pool_size + max_overflow`` drawn as lines), waiters (with
``max_waiting``) and wait time (p50, p99 and the oldest waiter, with
``pool_timeout``). The spike is shaded. Both libraries come with the ``cli``
extra and are imported only here, only when a chart is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ._args import describe
from ._series import Run, Sample

__all__ = ["SUFFIXES", "check_plot_target", "write_plot"]

SUFFIXES: Final = {".png": "matplotlib", ".html": "plotly"}

_ROWS: Final = (
    "load (req/s)",
    "connections",
    "waiting requests",
    "wait (s)",
)

#: Rate windows for "timed out per second", in seconds.
_RATE_WINDOW: Final = 1.0


def check_plot_target(path: str) -> str | None:
    """Why ``path`` cannot be drawn (unknown suffix, library missing), or None."""
    suffix = Path(path).suffix.lower()
    library = SUFFIXES.get(suffix)
    if library is None:
        return f"argument --plot: expected a file ending in .png or .html, got {path!r}"
    try:
        __import__(library)
    except ImportError:
        return (
            f"argument --plot: {suffix} charts need {library}: "
            "pip install 'sqlalchemy-asyncpool[cli]'"
        )
    return None


@dataclass(frozen=True, slots=True)
class _Line:
    name: str
    ys: list[float | None]
    color: str
    dash: bool = False


@dataclass(frozen=True, slots=True)
class _Limit:
    name: str
    y: float
    color: str
    dash: str  # "dash" or "dot"


@dataclass(frozen=True, slots=True)
class _Panel:
    xs: list[float]
    lines: list[_Line]
    limits: list[_Limit]


def _per_second(samples: Sequence[Sample], field: str) -> list[float | None]:
    """Rate of a cumulative counter over the last second at each sample."""
    out: list[float | None] = []
    start = 0
    for s in samples:
        while samples[start].t < s.t - _RATE_WINDOW:
            start += 1
        first = samples[start]
        span = s.t - first.t
        out.append((getattr(s, field) - getattr(first, field)) / span if span > 0 else 0.0)
    return out


def _panels(run: Run) -> list[_Panel]:
    samples = run.samples
    xs = [s.t for s in samples]
    cfg = run.config

    def col(name: str) -> list[float | None]:
        return [getattr(s, name) for s in samples]

    load = _Panel(
        xs,
        [
            _Line("offered (profile)", col("offered"), "#7f7f7f", dash=True),
            _Line("arrived (last 1 s)", col("arrival_rate"), "#1f77b4"),
            _Line("timed out (last 1 s)", _per_second(samples, "timed_out"), "#d62728"),
            _Line("rejected (last 1 s)", _per_second(samples, "rejected"), "#9467bd"),
        ],
        [],
    )
    connections = _Panel(
        xs,
        [
            _Line("in use", col("checked_out"), "#2ca02c"),
            _Line("open", col("size"), "#17becf", dash=True),
            _Line("opened so far", col("connects"), "#ff7f0e", dash=True),
        ],
        [
            _Limit("pool_size", cfg.pool_size, "#555555", "dash"),
            _Limit("pool_size + max_overflow", cfg.max_size, "#000000", "dot"),
        ],
    )
    waiting = _Panel(
        xs,
        [_Line("waiting", col("waiting"), "#ff7f0e")],
        [_Limit("max_waiting", cfg.max_waiting, "#9467bd", "dot")] if cfg.max_waiting else [],
    )
    wait = _Panel(
        xs,
        [
            _Line("wait p50 (last 1 s)", col("wait_p50"), "#1f77b4"),
            _Line("wait p99 (last 1 s)", col("wait_p99"), "#d62728"),
            _Line("oldest waiter", col("oldest_waiter"), "#ff7f0e", dash=True),
        ],
        [_Limit("pool_timeout", cfg.pool_timeout, "#000000", "dot")],
    )
    return [load, connections, waiting, wait]


def _top(panel: _Panel) -> float:
    """Highest value of a panel, limits included, so no limit line sits on the frame."""
    values = [y for line in panel.lines for y in line.ys if y is not None]
    values += [limit.y for limit in panel.limits]
    return max(values, default=0.0) or 1.0


def _spike(run: Run) -> tuple[float, float] | None:
    start = 0.0
    for phase in run.profile.phases:
        if phase.name == "spike":
            return start, start + phase.seconds
        start += phase.seconds
    return None


def _title(run: Run) -> str:
    return f"{run.label}  ({describe(run.config)})"


def write_plot(path: str, runs: Sequence[Run]) -> Path:
    """Draw ``runs`` side by side into ``path`` (.png or .html); returns the path."""
    target = Path(path)
    if target.suffix.lower() == ".png":
        _png(target, runs)
    else:
        _html(target, runs)
    return target


def _png(target: Path, runs: Sequence[Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in CI and over SSH
    import matplotlib.pyplot as plt

    n = len(runs)
    panels = [_panels(run) for run in runs]
    tops = [max([_top(p[r]) for p in panels], default=1.0) * 1.08 for r in range(len(_ROWS))]
    fig, axes = plt.subplots(
        len(_ROWS), n, figsize=(6.5 * n, 11), sharex=True, sharey="row", squeeze=False
    )
    try:
        for c, run in enumerate(runs):
            spike = _spike(run)
            for r, panel in enumerate(panels[c]):
                ax: Any = axes[r][c]
                ax.set_ylim(0, tops[r])
                if spike:
                    ax.axvspan(*spike, color="#f2d7d5", alpha=0.5, lw=0)
                for line in panel.lines:
                    ys = [float("nan") if y is None else y for y in line.ys]
                    ax.plot(
                        panel.xs,
                        ys,
                        label=line.name,
                        color=line.color,
                        lw=1.5,
                        ls="--" if line.dash else "-",
                    )
                for limit in panel.limits:
                    ax.axhline(
                        limit.y,
                        color=limit.color,
                        lw=1,
                        ls="--" if limit.dash == "dash" else ":",
                        label=f"{limit.name} = {limit.y:g}",
                    )
                ax.grid(True, alpha=0.3)
                if c == 0:
                    ax.set_ylabel(_ROWS[r])
                ax.legend(loc="upper left", fontsize="x-small")
            axes[0][c].set_title(_title(run), fontsize="medium")
            axes[-1][c].set_xlabel("seconds")
        fig.suptitle(f"asyncpool simulate: {runs[0].profile.describe()}", fontsize="small")
        fig.tight_layout()
        fig.savefig(target, dpi=110)
    finally:
        plt.close(fig)


def _html(target: Path, runs: Sequence[Run]) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(runs)
    fig = make_subplots(
        rows=len(_ROWS),
        cols=n,
        shared_xaxes=True,
        shared_yaxes=True,
        subplot_titles=[_title(run) if r == 0 else "" for r in range(len(_ROWS)) for run in runs],
        vertical_spacing=0.05,
        horizontal_spacing=0.04,
    )
    for c, run in enumerate(runs, start=1):
        spike = _spike(run)
        for r, panel in enumerate(_panels(run), start=1):
            if spike:
                fig.add_vrect(
                    x0=spike[0], x1=spike[1], fillcolor="#f2d7d5", opacity=0.5,
                    line_width=0, row=r, col=c,
                )  # fmt: skip
            for line in panel.lines:
                fig.add_trace(
                    go.Scatter(
                        x=panel.xs,
                        y=line.ys,
                        name=line.name,
                        legendgroup=line.name,
                        showlegend=c == 1,
                        mode="lines",
                        line={"color": line.color, "dash": "dash" if line.dash else "solid"},
                    ),
                    row=r,
                    col=c,
                )
            for limit in panel.limits:
                fig.add_hline(
                    y=limit.y,
                    line={"color": limit.color, "dash": limit.dash, "width": 1},
                    annotation_text=f"{limit.name} = {limit.y:g}",
                    annotation_position="top left",
                    row=r,
                    col=c,
                )
            if c == 1:
                fig.update_yaxes(title_text=_ROWS[r - 1], row=r, col=c)
        fig.update_xaxes(title_text="seconds", row=len(_ROWS), col=c)
    fig.update_layout(
        title=f"asyncpool simulate: {runs[0].profile.describe()}",
        height=1000,
        template="plotly_white",
    )
    fig.write_html(str(target), include_plotlyjs=True, full_html=True)
