"""Turn raw benchmark cells into summaries, target verdicts and Markdown tables.

Every ratio is *paired*: variant and baseline measured in the same round
(adjacent in time), divided, and the median (min-max) of those per-round
ratios reported. Neighbouring cells share the machine's momentary load, so
paired ratios are steadier than a ratio of medians on a shared machine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Final

from ._stats import spread

#: (variant, baseline, metric, goal, kind, label) checked at concurrency 10.
#: kind "min": the ratio must be >= goal; "max": <= goal.
TARGETS: Final = (
    (
        "ap_default",
        "sa",
        "ops_s",
        0.95,
        "min",
        "asyncpool defaults vs plain SQLAlchemy without pre-ping, ops/s, c10",
    ),
    (
        "ap_default",
        "sa_preping",
        "ops_s",
        1.25,
        "min",
        "asyncpool defaults vs plain SQLAlchemy with pre-ping, ops/s, c10",
    ),
    (
        "ap_default",
        "ap_notel_sdk",
        "cpu_us_op",
        1.05,
        "max",
        "telemetry on (SDK) vs off, SDK installed in both, client CPU/op, c10 (cost <= 5%)",
    ),
    (
        "ap_default",
        "ap_notel",
        "cpu_us_op",
        1.05,
        "max",
        "telemetry on (SDK) vs off without any SDK in the process, client CPU/op, c10",
    ),
    (
        "ap_noop",
        "ap_notel",
        "cpu_us_op",
        1.01,
        "max",
        "telemetry on (no-op API, no SDK) vs off, client CPU/op, c10 (cost <= 1%)",
    ),
)

#: The same targets measured inside one process (benchmarks/inprocess.py), as
#: CPU per op of SELECT 1 at c10 (one core saturated: ops/s ~ 1 / CPU per op,
#: so ">= 0.95x ops/s" is "<= 1/0.95 = 1.053x CPU"): (engine, baseline, goal, label).
IN_PROCESS_TARGETS: Final = (
    ("on", "sa", 1 / 0.95, "one process: asyncpool defaults vs plain SQLAlchemy, CPU/op, c10"),
    (
        "on",
        "sa_preping",
        1 / 1.25,
        "one process: asyncpool defaults vs SQLAlchemy with pre-ping, CPU/op, c10",
    ),
    ("on", "off", 1.05, "one process: telemetry on (SDK) vs off, CPU/op, c10 (cost <= 5%)"),
)

#: "Flat" memory: the soak's second-half RSS slope under 1 byte per checkout.
FLAT_KIB: Final = 100_000 / 1024

#: Telemetry comparisons shown at every concurrency: (variant, against, label).
TELEMETRY_COSTS: Final = (
    ("ap_default", "ap_notel", "telemetry on, SDK + in-memory readers, vs off"),
    ("ap_public_record", "ap_notel", "same, histograms via public record(), vs off"),
    ("ap_default", "ap_notel_sdk", "telemetry on vs off, SDK installed in both processes"),
    ("ap_notel_sdk", "ap_notel", "telemetry off: SDK installed vs not"),
    ("ap_noop", "ap_notel", "telemetry on, no SDK (no-op API), vs off"),
    ("ap_unset", "ap_notel", "telemetry on, SDK importable, no provider set, vs off"),
    ("ap_ping_always", "ap_notel", "pre-ping on every checkout (skip window 0), vs off"),
)


#: psycopg rows against each other and against asyncpg: (variant, baseline, label).
PSYCOPG_COMPARISONS: Final = (
    ("pg_ap_default", "pg_sa", "asyncpool on psycopg vs plain SQLAlchemy on psycopg"),
    ("pg_ap_default", "pg_pool", "asyncpool on psycopg vs psycopg_pool"),
    ("pg_ap_default", "pg_raw", "asyncpool on psycopg vs raw psycopg connections"),
    ("pg_ap_default", "ap_default", "asyncpool on psycopg vs asyncpool on asyncpg"),
    ("pg_sa", "sa", "plain SQLAlchemy: psycopg vs asyncpg"),
    ("pg_pool", "asyncpg", "psycopg_pool vs asyncpg's pool"),
)


def summarise_throughput(raw: list[dict[str, Any]], baselines: Iterable[str]) -> dict[str, Any]:
    """``{variant: {concurrency: {ops_s, cpu_us_op, vs_<baseline>: {...}}}}`` from raw cells."""
    by_cell: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
    for cell in raw:
        by_cell[(cell["variant"], cell["concurrency"])][cell["round"]] = cell
    summary: dict[str, Any] = defaultdict(dict)
    for (variant, conc), rounds in sorted(by_cell.items()):
        entry: dict[str, Any] = {
            "rounds": len(rounds),
            "ops_s": spread([r["ops_s"] for r in rounds.values()]),
            "cpu_us_op": spread([r["cpu_us_op"] for r in rounds.values()]),
            "machine_steal": spread([r.get("machine_steal", math.nan) for r in rounds.values()]),
        }
        comparisons = (*TELEMETRY_COSTS, *PSYCOPG_COMPARISONS)
        for base in (*baselines, *(c[1] for c in comparisons), *(t[1] for t in TARGETS)):
            key = f"vs_{base}"
            if key in entry or (base, conc) not in by_cell:
                continue
            entry[key] = paired_ratios(rounds, by_cell[(base, conc)])
        summary[variant][conc] = entry
    return dict(summary)


def paired_ratios(
    rounds: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Per-round ratios variant / baseline of ops/s and CPU per op, as median (min-max)."""
    shared = sorted(set(rounds) & set(base))
    return {
        metric: spread([rounds[r][metric] / base[r][metric] for r in shared])
        for metric in ("ops_s", "cpu_us_op")
    }


def summarise_rounds(raw: list[dict[str, Any]], metrics: Iterable[str]) -> dict[str, Any]:
    """``{variant: {metric: median (min-max)}}`` over rounds (overload, reject)."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in raw:
        grouped[cell["variant"]].append(cell)
    names = list(metrics)
    return {
        variant: {m: spread([float(c[m]) for c in cells]) for m in names} | {"rounds": len(cells)}
        for variant, cells in grouped.items()
    }


def _ratio_verdict(
    label: str, ratio: dict[str, float], goal: float, kind: str, unit: str
) -> dict[str, Any]:
    """A ratio target's row; kind "min": the median must be >= goal, "max": <= goal."""
    med, low, high = ratio["median"], ratio["min"], ratio["max"]
    met = med >= goal if kind == "min" else med <= goal
    # The per-round range straddling the goal means one run cannot settle it.
    sure = (
        (low >= goal if kind == "min" else high <= goal)
        if met
        else (high < goal if kind == "min" else low > goal)
    )
    return {
        "target": label,
        "goal": f"{'>=' if kind == 'min' else '<='} {goal:.3f}x{' ' + unit if unit else ''}",
        "measured": f"{med:.3f}x ({low:.2f}-{high:.2f})",
        "met": met,
        "verdict": ("met" if met else "NOT met") + ("" if sure else " (within noise)"),
    }


def verdicts(
    throughput: dict[str, Any],
    overload: dict[str, Any],
    reject: dict[str, Any],
    soak: dict[str, Any] | None = None,
    inprocess: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each target of issue #8 with the measured value and whether it was reached."""
    out: list[dict[str, Any]] = []
    select = (inprocess or {}).get("select", {})
    for engine, base, goal, label in IN_PROCESS_TARGETS:
        ratio = select.get(engine, {}).get(f"vs_{base}")
        if ratio is not None:
            out.append(_ratio_verdict(label, ratio, goal, "max", "CPU"))
    for variant, base, metric, goal, kind, label in TARGETS:
        ratio = throughput.get(variant, {}).get(10, {}).get(f"vs_{base}", {}).get(metric)
        if ratio is not None:
            out.append(_ratio_verdict(label, ratio, goal, kind, ""))
    ap, apg = overload.get("ap_default"), overload.get("asyncpg")
    if ap and apg:
        timeouts = ap["timeouts"]["median"]
        p99, base_p99 = ap["wait_p99_ms"]["median"], apg["wait_p99_ms"]["median"]
        out.append(
            {
                "target": "overload: asyncpool timeouts (per window)",
                "goal": "0",
                "measured": f"{timeouts:.0f} (max {ap['timeouts']['max']:.0f})",
                "met": ap["timeouts"]["max"] == 0,
                "verdict": "met" if ap["timeouts"]["max"] == 0 else "NOT met",
            }
        )
        out.append(
            {
                "target": "overload: asyncpool p99 checkout wait vs asyncpg pool's",
                "goal": f"<= {base_p99:.0f} ms",
                "measured": f"{p99:.0f} ms",
                "met": p99 <= base_p99,
                "verdict": "met" if p99 <= base_p99 else "NOT met",
            }
        )
    rej = reject.get("ap_default")
    if rej:
        p99 = rej["reject_p99_ms"]["median"]
        out.append(
            {
                "target": "max_waiting rejection latency p99 under a 10x spike (telemetry on)",
                "goal": "< 1 ms",
                "measured": f"{p99:.3f} ms (rounds {rej['reject_p99_ms']['min']:.3f}-"
                f"{rej['reject_p99_ms']['max']:.3f}; CPU p99 "
                f"{rej['reject_cpu_p99_ms']['median']:.3f} ms)",
                "met": p99 < 1.0,
                "verdict": "met" if p99 < 1.0 else "NOT met",
            }
        )
    soak = soak or {}
    slope = soak.get("second-half slope", "")
    if slope:
        kib = float(slope.split()[0])
        out.append(
            {
                "target": "memory flat over one million checkouts (benchmarks/soak.py)",
                "goal": f"slope < {FLAT_KIB:.0f} KiB per 100,000 (1 byte per checkout)",
                "measured": f"peak growth {soak['peak growth']}, slope {slope}",
                "met": kib < FLAT_KIB,
                "verdict": "met" if kib < FLAT_KIB else "NOT met",
            }
        )
    return out


# ------------------------------------------------------------------ Markdown


def _fmt(value: float, digits: int = 0) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:,.{digits}f}"


def _span(s: dict[str, float], digits: int = 0) -> str:
    return f"{_fmt(s['median'], digits)} ({_fmt(s['min'], digits)}-{_fmt(s['max'], digits)})"


def _ratio(entry: dict[str, Any], base: str, metric: str) -> str:
    ratio = entry.get(f"vs_{base}")
    if ratio is None:
        return "-"
    s = ratio[metric]
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def markdown(result: dict[str, Any]) -> str:
    """The run as a RESULTS.md section."""
    meta, settings = result["meta"], result["settings"]
    lines = [
        f"## {meta['started']} - {settings['mode']} run ({meta['duration_s']:.0f} s)",
        "",
        "| | |",
        "|---|---|",
    ]
    for key in (
        "machine",
        "python",
        "sqlalchemy",
        "asyncpg",
        "psycopg",
        "greenlet",
        "opentelemetry",
        "postgresql",
        "database",
        "asyncpool",
        "telemetry",
        "load",
    ):
        lines.append(f"| {key} | {meta.get(key, '-')} |")
    lines.append("")
    throughput = result["throughput"]["summary"]
    labels = result["labels"]
    if throughput:
        lines += [
            f"Throughput: pool {settings['pool_size']} (no overflow), `SELECT 1` per checkout, "
            f"{settings['rounds']} interleaved rounds, {settings['warmup']} s warm-up + "
            f"{settings['window']} s window per cell (telemetry collected inside the window). "
            "Values: median (min-max) over rounds; ratios: median (min-max) of per-round "
            "paired ratios. CPU = client process CPU time / ops.",
            "",
        ]
    for conc in settings["concurrency"] if throughput else []:
        lines += [
            f"**Concurrency {conc}**",
            "",
            "| variant | ops/s | CPU us/op | x SA ops/s | x SA CPU | x asyncpg ops/s | "
            "x asyncpg CPU |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for variant in settings["variants"]:
            entry = throughput.get(variant, {}).get(conc) or throughput.get(variant, {}).get(
                str(conc)
            )
            if not entry:
                continue
            lines.append(
                f"| {labels.get(variant, variant)} | {_span(entry['ops_s'])} | "
                f"{_span(entry['cpu_us_op'], 1)} | {_ratio(entry, 'sa', 'ops_s')} | "
                f"{_ratio(entry, 'sa', 'cpu_us_op')} | {_ratio(entry, 'asyncpg', 'ops_s')} | "
                f"{_ratio(entry, 'asyncpg', 'cpu_us_op')} |"
            )
        lines.append("")
    driver_rows = []
    for variant, base, label in PSYCOPG_COMPARISONS:
        cells = []
        for conc in settings["concurrency"]:
            ratio = throughput.get(variant, {}).get(conc, {}).get(f"vs_{base}")
            if ratio is None:
                cells.append("-")
                continue
            ops, cpu = ratio["ops_s"], ratio["cpu_us_op"]
            cells.append(
                f"{ops['median']:.2f}x ({ops['min']:.2f}-{ops['max']:.2f}) / {cpu['median']:.2f}x"
            )
        if any(c != "-" for c in cells):
            driver_rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if driver_rows:
        header = " | ".join(f"c{c}: ops/s (range) / CPU/op" for c in settings["concurrency"])
        lines += [
            "**psycopg 3** (paired per round: ops/s ratio, CPU per op ratio)",
            "",
            f"| comparison | {header} |",
            "|---|" + "--:|" * len(settings["concurrency"]),
            *driver_rows,
            "",
        ]
    cost_rows = []
    for variant, base, label in TELEMETRY_COSTS:
        cells = []
        for conc in settings["concurrency"]:
            entry = throughput.get(variant, {}).get(conc, {})
            ratio = entry.get(f"vs_{base}")
            if ratio is None:
                cells.append("-")
                continue
            cpu, ops = ratio["cpu_us_op"], ratio["ops_s"]
            cells.append(
                f"{100 * (cpu['median'] - 1):+.1f}% ({100 * (cpu['min'] - 1):+.0f}..."
                f"{100 * (cpu['max'] - 1):+.0f}) / {100 * (ops['median'] - 1):+.1f}%"
            )
        if any(c != "-" for c in cells):
            cost_rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if cost_rows:
        header = " | ".join(f"c{c}: CPU/op (range) / ops/s" for c in settings["concurrency"])
        lines += [
            "**What telemetry and the pre-ping cost** (paired per round: CPU per op, ops/s)",
            "",
            f"| comparison | {header} |",
            "|---|" + "--:|" * len(settings["concurrency"]),
            *cost_rows,
            "",
        ]
    overload = result.get("overload", {}).get("summary")
    if overload:
        o = result["settings"]["overload"]
        lines += [
            f"**Overload** (pool {o['pool_size']} + {o['max_overflow']} overflow, timeout "
            f"{o['timeout']:g} s, {o['tasks']} tasks looping checkout / "
            f"`pg_sleep({o['hold']:g})` / release; {o['rounds']} rounds, {o['window']} s "
            "window): median (min-max) over rounds",
            "",
            "| pool | ops/s | wait p50 ms | p95 ms | p99 ms | max ms | timeouts / window "
            "| CPU us/op |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for variant in o["variants"]:
            s = overload.get(variant)
            if not s:
                continue
            lines.append(
                f"| {o['labels'][variant]} | {_span(s['ops_s'])} | {_span(s['wait_p50_ms'], 1)} "
                f"| {_span(s['wait_p95_ms'], 1)} | {_span(s['wait_p99_ms'], 1)} | "
                f"{_span(s['wait_max_ms'])} | {_span(s['timeouts'])} | {_span(s['cpu_us_op'])} |"
            )
        lines.append("")
    reject = result.get("reject", {}).get("summary")
    if reject:
        r = result["settings"]["reject"]
        lines += [
            f"**Rejection by `max_waiting`** (pool {r['pool_size']}, max_waiting "
            f"{r['max_waiting']}, kept busy by {r['pool_size']} looping tasks; {r['spikes']} "
            f"spikes of {r['spike']} callers at once per round, {r['rounds']} rounds): "
            "median (min-max) over rounds",
            "",
            "| variant | rejected | served | timeouts | reject p50 ms | reject p99 ms | "
            "reject max ms | CPU per refusal p50 / p99 ms | answered p99 ms (from spike start) |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for variant, s in reject.items():
            lines.append(
                f"| {labels.get(variant, variant)} | {_span(s['rejected'])} | "
                f"{_span(s['served'])} | {_span(s['timeouts'])} | "
                f"{_span(s['reject_p50_ms'], 3)} | {_span(s['reject_p99_ms'], 3)} | "
                f"{_span(s['reject_max_ms'], 3)} | {_fmt(s['reject_cpu_p50_ms']['median'], 3)} / "
                f"{_fmt(s['reject_cpu_p99_ms']['median'], 3)} | {_span(s['answered_p99_ms'], 2)} |"
            )
        lines.append("")
    ab = result.get("inprocess")
    if ab and "select" in ab:
        from .inprocess import table

        lines += [
            f"**One process A/B** (benchmarks/inprocess.py: five engines in one process with "
            f"the SDK installed, {ab.get('rounds', '?')} rotating rounds, c10; CPU per op, "
            "ratios paired per round)",
            "",
            table(ab),
            "",
        ]
    soak = result.get("soak")
    if soak:
        lines += [f"**Memory soak** (benchmarks/soak.py, issue #5): {soak['summary']}", ""]
    if result.get("targets"):
        lines += [
            "**Targets (issue #8)**",
            "",
            "| target | goal | measured | verdict |",
            "|---|---|---|---|",
        ]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {t['verdict']} |")
        lines.append("")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    if result.get("notes"):
        lines.append("")
    return "\n".join(lines) + "\n"
