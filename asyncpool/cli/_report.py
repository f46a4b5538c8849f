"""Console output: lines, tables, and the simulation's summary side by side.

Tables are drawn with rich (extra ``cli``) when it is installed; without it
the same rows come out as aligned plain text, so ``advise`` and ``check``
work on a bare install too.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import IO, Any, Final

from ._series import Run, Summary

__all__ = ["Output", "fmt_seconds", "summary_rows", "verdict"]

#: Width used when stdout is not a terminal (pipes, CI logs): wide enough for
#: two configurations side by side without wrapping.
_PIPE_WIDTH: Final = 120

_NUMBER: Final = re.compile(r"^-?[\d.]+( |%|$)|^-$")


class Output:
    """Where a command writes. ``console`` is a rich Console, or None without rich."""

    def __init__(self, file: IO[str] | None = None) -> None:
        self.file = file if file is not None else sys.stdout
        self.console: Any = None
        try:
            from rich.console import Console
        except ImportError:  # pragma: no cover - depends on the extra
            return
        terminal = self.file.isatty()
        self.console = Console(
            file=self.file,
            width=None if terminal else _PIPE_WIDTH,
            highlight=False,
            soft_wrap=False,
        )

    @property
    def is_terminal(self) -> bool:
        if self.console is not None:
            return bool(self.console.is_terminal)
        return self.file.isatty()

    def say(self, text: str = "", *, style: str | None = None) -> None:
        if self.console is not None:
            self.console.print(text, markup=False, style=style, soft_wrap=True)
        else:
            print(text, file=self.file, flush=True)

    def error(self, text: str) -> None:
        """An error line on stderr (the caller returns a non-zero status)."""
        print(f"error: {text}", file=sys.stderr, flush=True)

    def table(
        self,
        headers: Sequence[str],
        rows: Sequence[Sequence[str]],
        *,
        title: str | None = None,
    ) -> None:
        """Columns of numbers are right-aligned, the rest (labels, words) left."""
        numeric = [
            i > 0 and all(_NUMBER.match(row[i]) for row in rows) for i in range(len(headers))
        ]
        if self.console is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left", show_edge=False)
            for header, right in zip(headers, numeric, strict=True):
                table.add_column(header, justify="right" if right else "left")
            for row in rows:
                table.add_row(*row)
            self.console.print(table)
            return
        if title:
            self.say(title)
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        for row in [headers, *rows]:
            cells = [
                c.rjust(w) if right else c.ljust(w)
                for c, w, right in zip(row, widths, numeric, strict=True)
            ]
            self.say("  ".join(cells))


def fmt_seconds(value: float | None) -> str:
    """``12 ms`` under a second, ``1.23 s`` above; ``-`` for nothing."""
    if value is None:
        return "-"
    if value < 1.0:
        return f"{value * 1000:.0f} ms" if value >= 0.001 else f"{value * 1000:.2f} ms"
    return f"{value:.2f} s"


def _count(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.0f}%)" if n and total else str(n)


def summary_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """The summary table: one column per configuration, one row per number."""
    summaries = [Summary.of(run) for run in runs]
    headers = ["", *(run.label for run in runs)]

    def row(label: str, cells: Sequence[str]) -> list[str]:
        return [label, *cells]

    rows = [
        row("requests", [str(s.requests) for s in summaries]),
        row("served", [str(s.served) for s in summaries]),
        row("timed out", [_count(s.timed_out, s.requests) for s in summaries]),
        row("rejected", [_count(s.rejected, s.requests) for s in summaries]),
        row("errors", [_count(s.errors + s.unfinished, s.requests) for s in summaries]),
        row("wait p50", [fmt_seconds(s.wait_p50) for s in summaries]),
        row("wait p95", [fmt_seconds(s.wait_p95) for s in summaries]),
        row("wait p99", [fmt_seconds(s.wait_p99) for s in summaries]),
        row("wait max", [fmt_seconds(s.wait_max) for s in summaries]),
        row(
            "peak connections in use",
            [
                f"{s.peak_in_use} of {r.config.max_size}"
                for s, r in zip(summaries, runs, strict=True)
            ],
        ),
        row("peak connections open", [str(s.peak_open) for s in summaries]),
        row("connections opened", [str(s.connects) for s in summaries]),
        row("open at the end", [str(s.open_at_end) for s in summaries]),
        row("peak waiting", [str(s.peak_waiting) for s in summaries]),
        row("mean hold", [fmt_seconds(s.hold_mean) for s in summaries]),
    ]
    return headers, rows


def verdict(run: Run) -> str:
    """One sentence on why this configuration did what it did (Little's law)."""
    s = Summary.of(run)
    profile = run.profile
    hold = s.hold_mean if s.hold_mean is not None else profile.hold
    needed = profile.peak_rate * hold
    size = run.config.max_size
    law = (
        f"at {profile.peak_rate:g} req/s with each request holding a connection "
        f"{fmt_seconds(hold)}, the peak keeps {profile.peak_rate:g} x {hold:.3f} = {needed:.1f} "
        f"connections busy on average (Little's law)"
    )
    failed = s.timed_out + s.rejected + s.errors + s.unfinished
    if not s.requests:
        return f"{run.label}: no requests arrived."
    if failed == 0:
        return (
            f"{run.label}: every request served; {law}, and this pool peaked at "
            f"{s.peak_in_use} of its {size}."
        )
    parts = []
    if s.timed_out:
        parts.append(f"{s.timed_out} timed out")
    if s.rejected:
        parts.append(f"{s.rejected} were rejected (max_waiting)")
    if s.errors or s.unfinished:
        parts.append(f"{s.errors + s.unfinished} failed with errors")
    what = f"{run.label}: {', '.join(parts)} of {s.requests}"
    if not (s.timed_out or s.rejected):
        return f"{what}; the pool was not the limit, see the first error."
    if needed > size:
        return f"{what}; {law}, and this pool has at most {size}."
    return (
        f"{what}; {law} against this pool's {size}, so the waits came from bursts above "
        "the average or from slow connects."
    )
