"""``asyncpool simulate``: a traffic spike against a real pool, watched live.

The default profile is the story every pool-sizing article tells: a service
quiet at 8 requests a second takes 120 a second for a while. ``--compare``
with no values runs the two configurations of that story, ``pool_size=5,
max_overflow=0`` against ``pool_size=10, max_overflow=20``, on the same
arrivals. Time is scaled down so the demo takes half a minute: the spike
lasts 6 s and the default ``pool_timeout`` is 3 s (``PoolConfig``'s is 10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from ..config import PoolConfig
from ..errors import ConfigurationError
from ._args import (
    UsageError,
    add_pool_flags,
    config_from_args,
    describe,
    non_negative,
    parse_config_spec,
)
from ._database import Database, describe_failure, open_database
from ._driver import drive
from ._live import LiveView, PlainLines, View
from ._plot import check_plot_target, write_plot
from ._profile import ARRIVALS, Profile
from ._report import Output, summary_rows, verdict
from ._series import Run, to_json
from ._server import ServerFacts, fetch_server_facts

__all__ = ["add_parser", "run"]

#: This command's own defaults for pool settings (the environment and flags
#: override them): a demo-scale pool_timeout for a demo-scale spike.
DEFAULTS: Final[dict[str, Any]] = {"pool_timeout": 3.0}

#: ``--compare`` with no values: the seed article's misconfigured and tuned pools.
SEED_PAIR: Final = ("5/0", "10/20")

#: Most configurations one ``--compare`` may put side by side.
MAX_COMPARE: Final = 4

#: Most requests one run may schedule (they are all kept for the summary).
MAX_REQUESTS: Final = 1_000_000

_NAME: Final = "asyncpool-simulate"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="drive a traffic spike through a pool and watch it live",
        description=(
            "Drive a real PostgreSQL through an asyncpool engine with a traffic profile:\n"
            "a steady rate, a spike, the steady rate again. Arrivals are open-loop:\n"
            "requests keep arriving whether or not earlier ones finished, which is what\n"
            "makes a spike hurt. Shows a live view, then a summary; --plot draws it."
        ),
        epilog=(
            "examples:\n"
            "  asyncpool simulate --compare                 # the seed story: 5/0 vs 10/20\n"
            "  asyncpool simulate --pool-size 5 --max-overflow 0 --plot spike.png\n"
            "  asyncpool simulate --compare 5/0 10/20/30 --spike-rate 200 --json run.json\n"
            "  DATABASE_URL=postgresql://app@db/app asyncpool simulate --hold 0.05"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        help="database URL (default: DATABASE_URL, else an embedded PostgreSQL started here)",
    )
    traffic = parser.add_argument_group("traffic profile")
    traffic.add_argument(
        "--rate",
        metavar="RATE",
        type=non_negative(float),
        default=8.0,
        help="steady requests per second (default 8)",
    )
    traffic.add_argument(
        "--before",
        metavar="SECONDS",
        type=non_negative(float),
        default=3.0,
        help="seconds at --rate before the spike (3)",
    )
    traffic.add_argument(
        "--spike-rate",
        metavar="RATE",
        type=non_negative(float),
        default=120.0,
        help="requests per second in the spike (120)",
    )
    traffic.add_argument(
        "--spike",
        metavar="SECONDS",
        type=non_negative(float),
        default=6.0,
        help="seconds of spike (6)",
    )
    traffic.add_argument(
        "--after",
        metavar="SECONDS",
        type=non_negative(float),
        default=3.0,
        help="seconds at --rate after the spike (3)",
    )
    work = traffic.add_mutually_exclusive_group()
    work.add_argument(
        "--hold",
        metavar="SECONDS",
        type=non_negative(float),
        default=0.1,
        help="seconds each request holds its connection: SELECT pg_sleep(SECONDS) (0.1)",
    )
    work.add_argument("--sql", help="run this statement instead of pg_sleep while holding")
    traffic.add_argument(
        "--arrivals",
        choices=ARRIVALS,
        default="poisson",
        help="poisson: random gaps, as independent users make (default); even: 1/rate apart",
    )
    traffic.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=1,
        help="random seed of the arrivals; same seed, same run (1)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--compare",
        nargs="*",
        metavar="CONFIG",
        help=(
            "run several configurations on the same arrivals, side by side: 5/0, 10/20/30 "
            "(pool_size/max_overflow[/pool_timeout]) or pool_size=5,max_overflow=0; each is "
            "applied on top of the pool flags. With no value: the seed story, 5/0 vs 10/20"
        ),
    )
    output.add_argument(
        "--plot",
        metavar="FILE",
        action="append",
        default=[],
        help="write a chart over time: .png or .html (repeat for both)",
    )
    output.add_argument("--json", metavar="FILE", help="write the raw series as JSON")
    output.add_argument(
        "--plain",
        action="store_true",
        help="print a plain line per second instead of the live view (automatic into a pipe)",
    )
    add_pool_flags(parser, DEFAULTS)
    return parser


def run(args: argparse.Namespace, out: Output) -> int:
    profile = _profile(args)
    base = config_from_args(args, DEFAULTS)
    configs = _configs(args.compare, base)
    for path in args.plot:
        problem = check_plot_target(path)
        if problem:
            raise UsageError(problem)
    targets = [("--plot", p) for p in args.plot] + ([("--json", args.json)] if args.json else [])
    for option, path in targets:
        if not Path(path).resolve().parent.is_dir():
            raise UsageError(f"argument {option}: no such directory for {path!r}")
    live = out.is_terminal and out.console is not None and not args.plain
    view: View = LiveView(out) if live else PlainLines(out)
    out.say(f"asyncpool simulate: {profile.describe()}")
    with open_database(args.url, say=out.say) as db:
        try:
            runs = asyncio.run(_simulate(db, configs, profile, view, out))
        except _Unreachable as exc:
            out.error(f"cannot reach {db.shown}: {exc}")
            return 1
        shown = db.shown
    _finish(runs, args, out, database=shown)
    return 0


class _Unreachable(Exception):
    """The database did not answer the probe (the message has no password)."""


def _profile(args: argparse.Namespace) -> Profile:
    profile = Profile.spike(
        rate=args.rate,
        before=args.before,
        spike_rate=args.spike_rate,
        spike=args.spike,
        after=args.after,
        hold=args.hold,
        sql=args.sql,
        arrivals=args.arrivals,
        seed=args.seed,
    )
    if profile.duration <= 0:
        raise UsageError("arguments --before/--spike/--after: the profile lasts 0 seconds")
    expected = sum(p.rate * p.seconds for p in profile.phases)
    if expected > MAX_REQUESTS:
        raise UsageError(
            f"arguments --rate/--spike-rate/--before/--spike/--after: about {expected:.0f} "
            f"requests; a run takes at most {MAX_REQUESTS}"
        )
    if not profile.arrival_times():
        raise UsageError("arguments --rate/--spike-rate: no request would arrive")
    return profile


def _configs(compare: Sequence[str] | None, base: PoolConfig) -> list[tuple[str, PoolConfig]]:
    name = base.name or _NAME
    if compare is None:
        label = f"{base.pool_size}/{base.max_overflow}"
        return [(label, base.replace(name=name))]
    specs = list(compare) or list(SEED_PAIR)
    if not 2 <= len(specs) <= MAX_COMPARE:
        raise UsageError(
            f"argument --compare: expected 2 to {MAX_COMPARE} configurations, got {len(specs)}"
        )
    configs = []
    for i, spec in enumerate(specs, start=1):
        label, config = parse_config_spec(spec, base)
        suffix = f"-{i}"
        configs.append((label, config.replace(name=name[: 63 - len(suffix)] + suffix)))
    return configs


async def _simulate(
    db: Database, configs: list[tuple[str, PoolConfig]], profile: Profile, view: View, out: Output
) -> list[Run]:
    timeout = max(c.connect_timeout for _, c in configs)
    try:
        facts = await fetch_server_facts(
            db.url, connect_timeout=timeout, application_name=f"{_NAME}-probe"
        )
    except ConfigurationError as exc:
        raise UsageError(f"argument --url: {exc}") from None
    except Exception as exc:
        raise _Unreachable(describe_failure(exc, db.secrets)) from None
    _about_server(db, facts, configs, out)
    runs = []
    for label, config in configs:
        run = Run(label, config, profile)
        out.say(f"\n{label}: {describe(config)}, max_waiting={config.max_waiting}")
        view.begin(run)
        try:
            await drive(db.url, run, on_sample=view.update)
        finally:
            view.end()
        runs.append(run)
    return runs


def _about_server(
    db: Database, facts: ServerFacts, configs: list[tuple[str, PoolConfig]], out: Output
) -> None:
    where = "embedded PostgreSQL" if db.source == "embedded" else db.shown
    out.say(
        f"database: {where} (PostgreSQL {facts.version}; max_connections {facts.max_connections}, "
        f"{facts.in_use} in use by others)"
    )
    free = facts.budget - facts.in_use
    for label, config in configs:
        if config.max_size > free:
            out.say(
                f"warning: {label} may open {config.max_size} connections but the server has "
                f"{free} free: expect 'too many clients' errors at the peak"
            )


def _finish(runs: list[Run], args: argparse.Namespace, out: Output, *, database: str) -> None:
    headers, rows = summary_rows(runs)
    out.say()
    out.table(headers, rows, title="summary")
    out.say()
    for run in runs:
        out.say(verdict(run))
        if run.first_error:
            out.say(f"  first error: {run.first_error}")
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(runs, database=database), indent=1))
        out.say(f"series written to {args.json}")
    for path in args.plot:
        write_plot(path, runs)
        out.say(f"chart written to {path}")
