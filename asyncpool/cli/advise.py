"""``asyncpool advise``: pool settings per process from the load, with the arithmetic shown.

Sizing is arithmetic people skip: Little's law for the connections a peak
keeps busy, headroom for random bursts, the fleet multiplied out across
processes and checked against the server's ``max_connections``. This command
does it and prints every step, so the numbers can be argued with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from typing import Any

from ..errors import ConfigurationError
from ._args import UsageError, within
from ._database import Database, describe_failure
from ._report import Output, fmt_seconds
from ._server import ServerFacts, fetch_server_facts
from ._sizing import LIMITS, Advice, Target, advise
from .simulate import MAX_REQUESTS

__all__ = ["add_parser", "run"]

#: The suggested ``simulate`` run keeps its spike to this many requests (the
#: rest of ``simulate``'s bound is left to the steady phases around it).
_SPIKE_REQUESTS = MAX_REQUESTS // 2

#: The spike ``simulate`` runs by default, in seconds.
_SPIKE_SECONDS = 6.0


def _flag(name: str) -> Any:
    """The argparse ``type=`` of a ``Target`` number: its range from ``LIMITS``."""
    low, high, low_excluded = LIMITS[name]
    kind = int if isinstance(low, int) else float
    return within(kind, low, high, low_excluded=low_excluded)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "advise",
        help="suggest pool settings per process from the load, showing the arithmetic",
        description=(
            "Suggest pool_size, max_overflow, pool_timeout and max_waiting per process\n"
            "from the peak load, the time a request holds its connection and the number\n"
            "of processes. Shows the arithmetic (Little's law, burst headroom, the fleet's\n"
            "connection budget, HikariCP's rule of thumb) and warns when the fleet would\n"
            "exceed the server. With --url: the server's limits, use and CPU count."
        ),
        epilog=(
            "examples:\n"
            "  asyncpool advise --peak-rps 120 --hold 0.1\n"
            "  asyncpool advise --peak-rps 400 --hold 0.05 --processes 8 --url $DATABASE_URL\n"
            "  asyncpool advise --peak-concurrent 40 --hold 0.2 --processes 4 "
            "--max-connections 100"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load = parser.add_argument_group("load (one of --peak-rps and --peak-concurrent)")
    peak = load.add_mutually_exclusive_group(required=True)
    peak.add_argument(
        "--peak-rps",
        type=_flag("peak_rps"),
        metavar="RATE",
        help="requests per second at peak, whole fleet",
    )
    peak.add_argument(
        "--peak-concurrent",
        type=_flag("peak_concurrent"),
        metavar="N",
        help="requests holding a connection at once at peak, whole fleet",
    )
    load.add_argument(
        "--hold",
        type=_flag("hold"),
        required=True,
        metavar="SECONDS",
        help="average seconds a request keeps its connection (query plus work in between)",
    )
    load.add_argument(
        "--processes",
        type=_flag("processes"),
        default=1,
        metavar="N",
        help="app processes sharing the database: workers x pods x engines (default 1)",
    )
    load.add_argument(
        "--request-timeout",
        type=_flag("request_timeout"),
        default=10.0,
        metavar="SECONDS",
        help="the caller's deadline: load balancer or client timeout (default 10)",
    )
    server = parser.add_argument_group("server")
    server.add_argument(
        "--url", help="read max_connections, reserved slots, current use and CPU count from here"
    )
    server.add_argument(
        "--max-connections",
        type=_flag("max_connections"),
        metavar="N",
        help="the server's max_connections, when not read with --url",
    )
    server.add_argument(
        "--server-cores",
        type=_flag("cores"),
        metavar="N",
        help="the server's CPU cores (read from the server when allowed, or this machine "
        "when the server is local)",
    )
    server.add_argument(
        "--spindles",
        type=_flag("spindles"),
        default=1,
        metavar="N",
        help="HikariCP's effective spindle count: disks serving at once (default 1)",
    )
    server.add_argument(
        "--reserve",
        type=_flag("reserve"),
        default=5,
        metavar="N",
        help="connections to leave free for admin, migrations and cron (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="print the advice as JSON")
    return parser


def run(args: argparse.Namespace, out: Output) -> int:
    facts: ServerFacts | None = None
    if args.url:
        try:
            facts = asyncio.run(
                fetch_server_facts(
                    args.url, connect_timeout=10.0, application_name="asyncpool-advise"
                )
            )
        except ConfigurationError as exc:
            raise UsageError(f"argument --url: {exc}") from None
        except Exception as exc:
            db = Database(args.url, "--url")
            out.error(f"cannot reach {db.shown}: {describe_failure(exc, db.secrets)}")
            return 1
    target = _target(args, facts)
    advice = advise(target)
    if args.json:
        out.say(json.dumps(_as_json(target, advice, facts), indent=2))
        return 0
    _print(args, target, advice, facts, out)
    return 0


def _target(args: argparse.Namespace, facts: ServerFacts | None) -> Target:
    cores = args.server_cores
    if cores is None and facts is not None:
        cores = facts.cores
    max_connections = args.max_connections
    reserved = 0
    in_use = None
    if facts is not None:
        max_connections = max_connections or facts.max_connections
        reserved = facts.superuser_reserved + facts.reserved
        in_use = facts.in_use
    return Target(
        hold=args.hold,
        processes=args.processes,
        peak_rps=args.peak_rps,
        peak_concurrent=args.peak_concurrent,
        request_timeout=args.request_timeout,
        reserve=args.reserve,
        spindles=args.spindles,
        cores=cores,
        max_connections=max_connections,
        reserved_slots=reserved,
        in_use=in_use,
    )


def _print(
    args: argparse.Namespace,
    target: Target,
    advice: Advice,
    facts: ServerFacts | None,
    out: Output,
) -> None:
    load = (
        f"{target.peak_rps:g} req/s at peak"
        if target.peak_rps is not None
        else f"{target.peak_concurrent:g} concurrent requests at peak"
    )
    out.say(
        f"asyncpool advise: {load}, {fmt_seconds(target.hold)} held per request, "
        f"{target.processes} process(es), {target.request_timeout:g} s request deadline"
    )
    if facts is not None:
        out.say(
            f"server: PostgreSQL {facts.version}; max_connections {facts.max_connections}, "
            f"reserved {facts.superuser_reserved + facts.reserved}, {facts.in_use} in use now; "
            f"CPU cores: {facts.cores if facts.cores is not None else '?'} ({facts.cores_source})"
        )
    out.say()
    out.say("the arithmetic")
    for i, step in enumerate(advice.steps, start=1):
        out.say(f"  {i:>2}. {step}")
    out.say()
    rows = [
        ["pool_size", str(advice.pool_size), "kept open; covers the average at peak"],
        ["max_overflow", str(advice.max_overflow), "opened for bursts, closed when returned"],
        ["pool_timeout", f"{advice.pool_timeout:g}", "seconds; half the request deadline"],
        ["max_waiting", str(advice.max_waiting), "refuse at once beyond this queue"],
    ]
    out.table(["setting", "per process", "why"], rows, title="advice")
    for warning in advice.warnings:
        out.say(f"warning: {warning}")
    out.say()
    env = " ".join(f"ASYNCPOOL_{k.upper()}={_number(v)}" for k, v in advice.settings().items())
    out.say(f"as environment: {env}")
    out.say(f"try it:         asyncpool simulate {_simulation(target, advice)}")


def _number(value: float) -> str:
    """A setting as ``PoolConfig.from_env`` and the flags parse it: integers never as 1e+06."""
    if isinstance(value, int):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _simulation(target: Target, advice: Advice) -> str:
    """``simulate`` flags for one process's share of the peak, within its bound on requests."""
    rate = (target.peak_rps or (target.peak_concurrent or 0) / target.hold) / target.processes
    rate = float(f"{rate:.4g}")
    flags = f"--spike-rate {rate:g}"
    if rate * _SPIKE_SECONDS > _SPIKE_REQUESTS:
        # A shorter spike, rounded down to the millisecond, so the run stays within bounds.
        spike = math.floor(_SPIKE_REQUESTS / rate * 1000) / 1000
        flags += f" --spike {spike:g}"
    return (
        f"{flags} --hold {target.hold:g} --pool-size {advice.pool_size} "
        f"--max-overflow {advice.max_overflow} --pool-timeout {_number(advice.pool_timeout)} "
        f"--max-waiting {advice.max_waiting}"
    )


def _as_json(target: Target, advice: Advice, facts: ServerFacts | None) -> dict[str, Any]:
    return {
        "settings": advice.settings(),
        "fleet_max": advice.fleet_max,
        "server_budget": advice.server_budget,
        "hikari_connections": advice.hikari_connections,
        "steps": advice.steps,
        "warnings": advice.warnings,
        "server": None
        if facts is None
        else {
            "version": facts.version,
            "max_connections": facts.max_connections,
            "superuser_reserved_connections": facts.superuser_reserved,
            "reserved_connections": facts.reserved,
            "in_use": facts.in_use,
            "cores": facts.cores,
            "cores_source": facts.cores_source,
        },
    }
