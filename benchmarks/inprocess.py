"""asyncpool vs plain SQLAlchemy, and telemetry on vs off, A/B inside one process.

    python benchmarks/inprocess.py                 # embedded PostgreSQL
    python benchmarks/inprocess.py --url postgresql://...

The throughput variants of ``run.py`` each run in their own process, and two
processes running the same code differ by a few percent (memory layout, hash
seeds, what the allocator hands out): ``ap_noop`` and ``ap_notel`` run the
very same hot path and still come out 1-3% apart. That is as much as
telemetry costs. Here one process, with the OpenTelemetry SDK installed (an
in-memory reader, as in ``ap_default``), holds five engines: plain
SQLAlchemy with and without ``pool_pre_ping``, asyncpool with telemetry on
(the defaults), on with the histograms through the public
``Histogram.record``, and off. They take turns in many short rounds (the
order rotating), and each round's CPU per op is divided by the baseline's
from the same round. Metrics are collected at the end of every window of a
telemetry engine, inside it.

Two loops: ``SELECT 1`` per checkout (the issue's measure) and
``async with engine.connect(): pass`` (no I/O: the pool's own cost, where
telemetry's share is largest). Concurrency 10, pool 10.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _otel_env  # noqa: E402

#: engine -> (label, kind, options, histograms through the public record())
ENGINES: Final = {
    "sa": ("plain SQLAlchemy", "sqlalchemy", {}, False),
    "sa_preping": (
        "plain SQLAlchemy, pool_pre_ping=True",
        "sqlalchemy",
        {"pool_pre_ping": True},
        False,
    ),
    "on": ("asyncpool defaults (telemetry on)", "asyncpool", {}, False),
    "on_public": (
        "asyncpool, telemetry on, histograms via public Histogram.record",
        "asyncpool",
        {},
        True,
    ),
    "off": ("asyncpool, telemetry=False", "asyncpool", {"telemetry": False}, False),
}
#: The ratios reported: (engine, baseline).
BASELINES: Final = ("off", "sa", "sa_preping")
LOOPS: Final = {"select": 0.4, "checkout": 0.2}  # loop -> seconds measured per cell
CONCURRENCY: Final = 10


async def measure(target: dict[str, str], rounds: int, telemetry: Any) -> dict[str, Any]:
    from benchmarks import variants
    from benchmarks._stats import spread

    subjects = {}
    for name, (_label, kind, options, public) in ENGINES.items():
        if public:  # read when the engine is instrumented, i.e. at creation
            os.environ["ASYNCPOOL_OTEL_BOUND_HISTOGRAMS"] = "0"
        variant = variants.Variant(name, name, "sdk", kind, tuple(options.items()))
        subjects[name] = await variants.open_subject(variant, target)
        os.environ.pop("ASYNCPOOL_OTEL_BOUND_HISTOGRAMS", None)
    order = list(ENGINES)
    out: dict[str, Any] = {}
    try:
        for loop, window in LOOPS.items():
            cpu: dict[str, list[float]] = {name: [] for name in ENGINES}
            for r in range(rounds):
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    subject = subjects[name]
                    op = subject.checkout if loop == "checkout" else subject.op
                    collect = telemetry.collect if name in ("on", "on_public") else None
                    cell = await variants.closed_loop(op, CONCURRENCY, 0.05, window, collect)
                    cpu[name].append(cell["cpu_us_op"])
            out[loop] = {
                name: {
                    "cpu_us_op": spread(cpu[name]),
                    **{
                        f"vs_{base}": spread(
                            [a / b for a, b in zip(cpu[name], cpu[base], strict=True)]
                        )
                        for base in BASELINES
                    },
                }
                for name in ENGINES
            }
    finally:
        for subject in subjects.values():
            await subject.close()
    return out


def table(result: dict[str, Any]) -> str:
    """CPU per op and the paired ratios; below 1.00x against SQLAlchemy is faster."""
    lines = [
        "| engine | loop | CPU us/op | x asyncpool telemetry off | x plain SQLAlchemy "
        "| x SQLAlchemy pre-ping |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for loop in LOOPS:
        for name, (label, *_rest) in ENGINES.items():
            entry = result[loop][name]
            cells = [
                f"{entry[f'vs_{base}']['median']:.3f} ({entry[f'vs_{base}']['min']:.2f}-"
                f"{entry[f'vs_{base}']['max']:.2f})"
                for base in BASELINES
            ]
            cpu = entry["cpu_us_op"]
            lines.append(
                f"| {label} | {loop} | {cpu['median']:.1f} ({cpu['min']:.1f}-{cpu['max']:.1f}) | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: an embedded server)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args()

    telemetry = _otel_env.setup("sdk")  # before asyncpool or SQLAlchemy is imported
    from benchmarks._worker import DSN_VARIABLE
    from benchmarks.run import database

    given = os.environ.get(DSN_VARIABLE)  # run.py passes its database this way
    with contextlib.nullcontext((given, "")) if given else database(args.url) as (dsn, _):
        target = {"dsn": dsn, "url": dsn.replace("postgresql://", "postgresql+asyncpg://", 1)}
        result = asyncio.run(measure(target, args.rounds, telemetry))
    result["rounds"] = args.rounds
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
