"""``asyncpool check URL``: can this app pool against this database, and how?

Connects once (plus a second connection to test for a pooler) and reports the
server version, latencies, the connection budget and who uses it, whether a
transaction pooler or a proxy sits in between, and the settings that follow.
Exit status 1, with the reason and without the password, when unreachable.

Pooler detection is by behaviour, not by name, since PgBouncer and friends
pass queries through unchanged: two client connections that run on one
server backend (``pg_backend_pid()``) mean transaction pooling; a server that
sees our connection coming from another address or port than our own socket
means a proxy, a session pooler or NAT. Neither test can prove there is *no*
session pooler behind a Unix socket, and the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from ..errors import ConfigurationError
from ._args import UsageError, positive
from ._database import ENV_URL, Database, describe_failure
from ._report import Output, fmt_seconds
from ._server import (
    DirectConnection,
    ServerFacts,
    connect_direct,
    is_local,
    local_address,
    read_server_facts,
)

__all__ = ["add_parser", "run"]

_APP: Final = "asyncpool-check"
_SAMPLES: Final = 7
#: Connections kept free for admin sessions, migrations and cron jobs.
_RESERVE: Final = 5
_TIMEOUTS_SQL: Final = """
SELECT name, setting::float8 * CASE unit WHEN 'ms' THEN 0.001 ELSE 1 END AS seconds
FROM pg_settings
WHERE name IN ('idle_session_timeout', 'idle_in_transaction_session_timeout', 'statement_timeout')
"""

TRANSACTION_POOLER: Final = "transaction pooler"
PROXY: Final = "proxy or session pooler"
DIRECT: Final = "direct"
UNKNOWN: Final = "unknown"


@dataclass(slots=True)
class Report:
    url: str
    version: str = ""
    connect: float = 0.0
    round_trip: float = 0.0
    query: float = 0.0
    facts: ServerFacts | None = None
    pooler: str = UNKNOWN
    pooler_evidence: list[str] = field(default_factory=list)
    timeouts: dict[str, float] = field(default_factory=dict)
    recommended: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "check",
        help="connect once and report latency, connection budget, pooler, advice",
        description=(
            "Connect once and report: server version, connect / round-trip / pre-ping "
            "latency, max_connections and current use by application_name, whether a "
            "transaction pooler or proxy sits in between, and recommended settings. Exit "
            "status 1 when the database cannot be reached (the reason is printed, never the "
            "password)."
        ),
    )
    parser.add_argument("url", nargs="?", metavar="URL", help=f"database URL (default: {ENV_URL})")
    parser.add_argument(
        "--processes",
        type=positive(int),
        default=1,
        metavar="N",
        help="app processes that will share the server, for the per-process budget (1)",
    )
    parser.add_argument(
        "--timeout",
        type=positive(float),
        default=10.0,
        metavar="SECONDS",
        help="seconds to wait for the connection (10)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def run(args: argparse.Namespace, out: Output) -> int:
    url = args.url or os.environ.get(ENV_URL)
    if not url:
        raise UsageError(f"argument URL: give a database URL or set {ENV_URL}")
    db = Database(url, "--url" if args.url else ENV_URL)
    try:
        report = asyncio.run(_inspect(db, args.timeout, args.processes))
    except ConfigurationError as exc:
        raise UsageError(f"argument URL: {exc}") from None
    except Exception as exc:
        out.error(f"cannot reach {db.shown}: {describe_failure(exc, db.secrets)}")
        return 1
    if args.json:
        data = asdict(report)
        out.say(json.dumps(data, indent=2, default=str))
    else:
        _print(report, args.processes, out)
    return 0


async def _median(call: Callable[[], Awaitable[Any]]) -> float:
    await call()  # warm-up: first use of the statement, caches, TCP window
    times = []
    for _ in range(_SAMPLES):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def _inspect(db: Database, connect_timeout: float, processes: int) -> Report:
    report = Report(db.shown)
    started = time.perf_counter()
    first = await connect_direct(db.url, connect_timeout=connect_timeout, application_name=_APP)
    report.connect = time.perf_counter() - started
    try:
        started = time.perf_counter()
        second = await connect_direct(
            db.url, connect_timeout=connect_timeout, application_name=_APP
        )
        # The first connect also paid for loading the driver (psycopg: ~0.2 s).
        report.connect = min(report.connect, time.perf_counter() - started)
        try:
            report.round_trip = await _median(lambda: first.execute("SELECT 1"))
            report.query = await _median(lambda: first.fetchval("SELECT $1::int", 1))
            pids = await _pooler(first, second, report)
            report.facts = await read_server_facts(first, local=is_local(db.url), own_pids=pids)
            report.version = report.facts.version
            rows = await first.fetch(_TIMEOUTS_SQL)
            report.timeouts = {r["name"]: float(r["seconds"]) for r in rows}
        finally:
            await second.close(timeout=connect_timeout)
    finally:
        await first.close(timeout=connect_timeout)
    _recommend(report, processes)
    return report


async def _pooler(first: DirectConnection, second: DirectConnection, report: Report) -> list[int]:
    """Test for a pooler by behaviour; returns every backend pid seen."""
    pid_sql = "SELECT pg_backend_pid()"
    a_pids, b_pids = [], []
    for _ in range(3):
        a_pids.append(int(await first.fetchval(pid_sql)))
        b_pids.append(int(await second.fetchval(pid_sql)))
    evidence = report.pooler_evidence
    shared = sorted(set(a_pids) & set(b_pids))
    if shared:
        evidence.append(
            f"two client connections ran on the same server backend (pid {shared[0]}): "
            "server connections are handed out per transaction"
        )
    if len(set(a_pids)) > 1:
        evidence.append(
            f"one client connection ran on several server backends {sorted(set(a_pids))}"
        )
    if evidence:
        report.pooler = TRANSACTION_POOLER
        return sorted(set(a_pids) | set(b_pids))

    row = await first.fetchrow(
        "SELECT host(client_addr) AS addr, client_port AS port, inet_server_port() AS sport "
        "FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    )
    ours = local_address(first)
    if ours is None:
        report.pooler = UNKNOWN
        evidence.append(
            "connected over a Unix socket: no transaction pooling seen, but the address test "
            "that would reveal a session pooler does not apply"
        )
    elif row is None or row["addr"] is None:
        report.pooler = PROXY
        evidence.append(
            f"we connect over TCP from {ours[0]}:{ours[1]} but the server sees a Unix-socket "
            "client: something relays the connection"
        )
    elif _same_address(ours, (row["addr"], row["port"])):
        report.pooler = DIRECT
        evidence.append(
            f"the server sees this connection coming from {row['addr']}:{row['port']}, our own "
            "socket, and each client connection has its own backend"
        )
    else:
        report.pooler = PROXY
        evidence.append(
            f"the server sees this connection coming from {row['addr']}:{row['port']}, not "
            f"from our socket {ours[0]}:{ours[1]}: a proxy, a session pooler or NAT relays it"
        )
    return sorted(set(a_pids) | set(b_pids))


def _same_address(ours: tuple[str, int], theirs: tuple[str, int]) -> bool:
    if ours[1] != theirs[1]:
        return False
    try:
        a, b = ipaddress.ip_address(ours[0]), ipaddress.ip_address(theirs[0])
    except ValueError:
        return ours[0] == theirs[0]
    a = getattr(a, "ipv4_mapped", None) or a
    b = getattr(b, "ipv4_mapped", None) or b
    return a == b


def _recommend(report: Report, processes: int) -> None:
    facts = report.facts
    rec = report.recommended
    notes = report.notes
    if facts is not None:
        free = facts.budget - _RESERVE - facts.in_use
        per_process = max(free // processes, 0)
        rec["max connections per process (pool_size + max_overflow)"] = per_process
        notes.append(
            f"budget: max_connections {facts.max_connections} - reserved "
            f"{facts.superuser_reserved + facts.reserved} - {_RESERVE} kept free for admin - "
            f"{facts.in_use} in use now = {free}, over {processes} process(es) = {per_process} "
            "each (asyncpool advise sizes within it from your load)"
        )
        if per_process < 1:
            notes.append(
                "no room for even one connection per process: close idle sessions, raise "
                "max_connections or put a pooler in front"
            )
    rec["connect_timeout"] = _clamp(10 * report.connect, 2.0, 10.0)
    rec["pre_ping_timeout"] = _clamp(10 * report.connect, 1.0, 5.0)
    notes.append(
        f"connect_timeout and pre_ping_timeout: 10 x the measured connect time "
        f"({fmt_seconds(report.connect)}), within 2-10 s and 1-5 s: a ping slower than ten "
        "reconnects is better replaced by one"
    )
    idle = report.timeouts.get("idle_session_timeout", 0)
    if idle > 0:
        rec["pool_recycle"] = round(idle * 0.9, 1)
        notes.append(
            f"idle_session_timeout is {idle:g} s: the server closes idle connections, "
            "so recycle them sooner (90 %) and keep pre_ping on"
        )
    if report.pooler == TRANSACTION_POOLER:
        rec["pooler"] = "pgbouncer"
        notes.append(
            "transaction pooler: named prepared statements (asyncpg's statement cache, "
            "psycopg's prepare_threshold) break when a transaction lands on another server "
            "connection; pooler='pgbouncer' (ASYNCPOOL_POOLER=pgbouncer) turns them off and "
            "uses unnamed statements. "
            "The pooler's own pool size, not max_connections, bounds the server side."
        )


def _clamp(value: float, low: float, high: float) -> float:
    return round(min(max(value, low), high), 1)


def _print(report: Report, processes: int, out: Output) -> None:
    facts = report.facts
    out.say(f"asyncpool check: {report.url}")
    out.say(f"reachable: PostgreSQL {report.version}")
    out.table(
        ["latency", "median", "what"],
        [
            ["connect", fmt_seconds(report.connect), "TCP/socket, TLS, authentication, startup"],
            [
                "round trip = pre-ping",
                fmt_seconds(report.round_trip),
                "SELECT 1, simple protocol: what asyncpool's pre-ping sends",
            ],
            [
                "parameterized query",
                fmt_seconds(report.query),
                "SELECT $1, extended protocol: parse, bind, execute",
            ],
        ],
    )
    if facts is not None:
        out.say(
            f"connections: max_connections {facts.max_connections}, reserved "
            f"{facts.superuser_reserved} (superuser) + {facts.reserved}, {facts.in_use} in use "
            f"by others; CPU cores: {facts.cores if facts.cores is not None else '?'} "
            f"({facts.cores_source})"
        )
        out.table(
            ["application_name", "active", "idle", "idle in transaction", "other", "total"],
            _usage_rows(facts),
        )
    out.say(f"pooler: {report.pooler}")
    for line in report.pooler_evidence:
        out.say(f"  {line}")
    if report.timeouts:
        shown = ", ".join(
            f"{k} {v:g} s" if v else f"{k} off" for k, v in sorted(report.timeouts.items())
        )
        out.say(f"server timeouts: {shown}")
    out.table(
        ["recommended", f"for {processes} process(es)"],
        [[k, str(v)] for k, v in report.recommended.items()],
    )
    for note in report.notes:
        out.say(f"  {note}")


def _usage_rows(facts: ServerFacts) -> list[list[str]]:
    by_app: dict[str, dict[str, int]] = {}
    for usage in facts.usage:
        counts = by_app.setdefault(usage.application_name, {})
        key = usage.state if usage.state in ("active", "idle", "idle in transaction") else "other"
        counts[key] = counts.get(key, 0) + usage.count
    rows = []
    for app, counts in sorted(by_app.items(), key=lambda kv: -sum(kv[1].values())):
        cells = [str(counts.get(k, 0)) for k in ("active", "idle", "idle in transaction", "other")]
        rows.append([app, *cells, str(sum(counts.values()))])
    return rows or [["(no other client connections)", "0", "0", "0", "0", "0"]]
