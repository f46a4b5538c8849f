"""What the simulation shows while it runs.

On a terminal: a rich live panel redrawn several times a second (connections
checked out, idle, overflow, waiters, recent wait quantiles, outcomes). Into a
pipe or a CI log: one plain line per ``every`` seconds, which reads well in a
file and costs nothing to redraw.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from ._args import describe
from ._report import Output, fmt_seconds
from ._series import Run, Sample

__all__ = ["LiveView", "PlainLines", "View", "frame"]

#: Redraws per second of the live panel.
REFRESH_PER_SECOND: Final = 8
_BAR: Final = 40
_PANEL_MAX: Final = 100
_VALUE_WIDTH: Final = 20
#: Columns of the panel that are not the bar: borders, padding, labels, values.
_FIXED_COLUMNS: Final = 52


class View(Protocol):
    def begin(self, run: Run) -> None: ...

    def update(self, run: Run, sample: Sample) -> None: ...

    def end(self) -> None: ...


def _phase(run: Run, t: float) -> str:
    phase = run.profile.phase_at(t)
    return phase.name if phase else "draining"


class PlainLines:
    """A line of numbers every ``every`` seconds; for pipes, files and CI logs."""

    def __init__(self, out: Output, every: float = 1.0) -> None:
        self.out = out
        self.every = every
        self.next_at = 0.0

    def begin(self, run: Run) -> None:
        self.next_at = 0.0

    def update(self, run: Run, sample: Sample) -> None:
        if sample.t + 1e-9 < self.next_at:
            return
        self.next_at = sample.t + self.every
        cfg = run.config
        self.out.say(
            f"{run.label:>8} {sample.t:5.1f}s {_phase(run, sample.t):<8} "
            f"offered {sample.offered:4.0f}/s  "
            f"out {sample.checked_out:>3}/{cfg.max_size:<3} idle {sample.idle:>3} "
            f"overflow {sample.overflow:>3}/{cfg.max_overflow:<3} waiting {sample.waiting:>4}  "
            f"wait p50 {fmt_seconds(sample.wait_p50):>7} p99 {fmt_seconds(sample.wait_p99):>7}  "
            f"served {sample.served:>5} timed out {sample.timed_out:>4} "
            f"rejected {sample.rejected:>4} errors {sample.errors:>3}"
        )

    def end(self) -> None:
        pass


class LiveView:
    """A rich ``Live`` panel for a terminal."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.live: Any = None
        self.peak_waiting = 1

    def begin(self, run: Run) -> None:
        from rich.live import Live

        self.peak_waiting = 1
        self.live = Live(
            frame(run, None, peak_waiting=1, width=self.out.console.width),
            console=self.out.console,
            refresh_per_second=REFRESH_PER_SECOND,
            transient=False,
        )
        self.live.start()

    def update(self, run: Run, sample: Sample) -> None:
        self.peak_waiting = max(self.peak_waiting, sample.waiting)
        if self.live is not None:
            self.live.update(
                frame(run, sample, peak_waiting=self.peak_waiting, width=self.out.console.width)
            )

    def end(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _bar(value: float, full: float, width: int = _BAR) -> str:
    cells = 0 if full <= 0 else round(width * min(value / full, 1.0))
    return "█" * cells + "·" * (width - cells)


def frame(run: Run, sample: Sample | None, *, peak_waiting: int, width: int = 100) -> Any:
    """The live panel for one moment of a run (a rich renderable) for a ``width``-column screen."""
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    cfg = run.config
    total = run.profile.duration
    bar = max(min(width - _FIXED_COLUMNS, _BAR), 8)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(justify="left", style="bold", no_wrap=True, min_width=14)
    grid.add_column(justify="left", no_wrap=True, min_width=bar)
    grid.add_column(justify="right", no_wrap=True, min_width=_VALUE_WIDTH)
    if sample is None:
        grid.add_row("starting", "", "")
    else:
        grid.add_row(
            _phase(run, sample.t), _bar(min(sample.t, total), total, bar),
            f"{sample.t:4.1f} of {total:g} s",
        )  # fmt: skip
        grid.add_row(
            "offered", f"{sample.offered:g} req/s", f"arriving {sample.arrival_rate:.0f}/s"
        )
        grid.add_row(
            "checked out",
            Text(_bar(sample.checked_out, cfg.max_size, bar), style="green"),
            f"{sample.checked_out} of {cfg.max_size}",
        )
        grid.add_row("idle", "", str(sample.idle))
        grid.add_row(
            "overflow",
            Text(_bar(sample.overflow, max(cfg.max_overflow, 1), bar), style="yellow"),
            f"{sample.overflow} of {cfg.max_overflow}",
        )
        grid.add_row(
            "waiting",
            Text(_bar(sample.waiting, peak_waiting, bar), style="red" if sample.waiting else ""),
            f"{sample.waiting}, oldest {fmt_seconds(sample.oldest_waiter)}"
            if sample.waiting
            else "0",
        )
        grid.add_row(
            "wait, last 1 s",
            f"p50 {fmt_seconds(sample.wait_p50)}  p99 {fmt_seconds(sample.wait_p99)}",
            f"max {fmt_seconds(sample.wait_max)}",
        )
        outcomes = Text(f"served {sample.served}  ")
        outcomes.append(
            f"timed out {sample.timed_out}", style="bold red" if sample.timed_out else ""
        )
        grid.add_row("requests", outcomes, f"in flight {sample.in_flight}")
        grid.add_row("", f"rejected {sample.rejected}  errors {sample.errors}", "")
    title = f"asyncpool simulate · {run.label} · {describe(cfg)}"
    return Panel(grid, title=title, title_align="left", width=min(width, _PANEL_MAX))
