"""Run every asyncpool benchmark: one command, one JSON file, one RESULTS.md section.

    python benchmarks/run.py            # full run, embedded PostgreSQL (~8 min)
    python benchmarks/run.py --soak     # the same plus the 1M-checkout memory soak (~10 min)
    python benchmarks/run.py --quick    # a fast sanity run (~1 min), not recorded
    python benchmarks/run.py --url postgresql://user@host:5432/db

Each variant runs in its own worker process (``_worker.py``) so that
OpenTelemetry's global providers never leak from one variant to another;
the workers take turns, one cell at a time, in rounds (A B C, B C A, ...),
so every variant sees the same machine conditions. The embedded server is
reached over its Unix socket, as in shared/research/perf.md.

Output: ``benchmarks/results/<time>.json`` (raw cells and summaries), a
table on stdout, and for full runs (or ``--record``) a section appended to
``benchmarks/RESULTS.md`` and ``benchmarks/latest.json`` rewritten.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's asyncpool, not an installed one

from benchmarks import _report  # noqa: E402
from benchmarks._worker import DSN_VARIABLE, package_versions  # noqa: E402
from benchmarks.overload import (  # noqa: E402
    HOLD,
    MAX_OVERFLOW,
    OVERLOAD_VARIANTS,
    TASKS,
    TIMEOUT,
)
from benchmarks.reject import MAX_WAITING, REJECT_VARIANTS, SPIKE  # noqa: E402
from benchmarks.variants import (  # noqa: E402
    BASELINES,
    POOL_SIZE,
    VARIANTS,
    psycopg_installed,
)

#: Variants run by default: the psycopg rows only where psycopg and psycopg_pool are installed.
DEFAULT_VARIANTS: Final = [v for v in VARIANTS if psycopg_installed() or not v.startswith("pg_")]

#: Settings of a full run (about 8 minutes on 2 cores with the psycopg rows) and of
#: --quick (about a minute).
FULL: Final = {
    "rounds": 9,
    "warmup": 0.3,
    "window": 0.8,
    "overload_rounds": 3,
    "overload_warmup": 0.5,
    "overload_window": 5.0,
    "reject_rounds": 3,
    "spikes": 20,
    "ab_rounds": 25,
}
QUICK: Final = {
    "rounds": 2,
    "warmup": 0.1,
    "window": 0.3,
    "overload_rounds": 1,
    "overload_warmup": 0.3,
    "overload_window": 2.5,
    "reject_rounds": 1,
    "spikes": 5,
    "ab_rounds": 3,
}
SPIKE_GAP: Final = 0.1
SOAK: Final = HERE / "soak.py"


class Worker:
    """A ``_worker.py`` process for one variant; ``ask()`` sends a command, waits for its reply."""

    def __init__(self, variant: str, dsn: str) -> None:
        self.dsn = dsn
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env[DSN_VARIABLE] = dsn  # not on the command line, where ps would show a password
        env.update(VARIANTS[variant].environ)
        self.variant = variant
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._worker", "--variant", variant],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, cmd: str, **args: Any) -> Any:
        stdin: IO[str] | None = self.process.stdin
        stdout: IO[str] | None = self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.variant} exited ({self.process.wait()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"worker {self.variant} failed on {cmd}:\n{reply['error']}")
        return reply["result"]

    def restart(self) -> None:
        """A fresh process for the same variant (another memory layout, another hash seed)."""
        self.close()
        self.__init__(self.variant, self.dsn)  # type: ignore[misc]

    def close(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.write('{"cmd": "quit"}\n')
                self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def database(url: str | None) -> Iterator[tuple[str, str]]:
    """(asyncpg DSN, description): ``url`` as given, else an embedded server's Unix socket."""
    if url:
        from sqlalchemy.engine import make_url

        parsed = make_url(url).set(drivername="postgresql")
        yield (
            parsed.render_as_string(hide_password=False),
            parsed.render_as_string(hide_password=True),
        )
        return
    from asyncpool.embedded import EmbeddedPostgres

    print("starting an embedded PostgreSQL ...", flush=True)
    with EmbeddedPostgres() as server:
        dsn = f"postgresql://postgres@/postgres?host={server.socket_dir}&port={server.port}"
        yield dsn, "embedded (asyncpool.embedded), Unix socket"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="PostgreSQL URL (default: an embedded server)")
    parser.add_argument("--quick", action="store_true", help="a fast sanity run, not recorded")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the throughput cells")
    parser.add_argument("--window", type=float, help="seconds measured per throughput cell")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 10, 50], help="concurrent tasks"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=list(DEFAULT_VARIANTS)
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=["throughput", "overload", "reject", "inprocess"],
    )
    parser.add_argument(
        "--soak", action="store_true", help="also run benchmarks/soak.py (issue #5, ~4 min more)"
    )
    parser.add_argument("--soak-checkouts", type=int, default=1_000_000)
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md even if quick")
    parser.add_argument(
        "--no-record", action="store_true", help="do not touch RESULTS.md / latest.json"
    )
    args = parser.parse_args()

    plan = dict(QUICK if args.quick else FULL)
    if args.rounds:
        plan["rounds"] = args.rounds
    if args.window:
        plan["window"] = args.window
    record = (args.record or not args.quick) and not args.no_record

    started = time.time()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H-%M-%SZ")
    with database(args.url) as (dsn, db_description):
        result = run(args, plan, dsn, db_description)
    result["meta"]["duration_s"] = time.time() - started
    result["meta"]["load"] += f" -> end {_loadavg()}"

    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{stamp}{'-quick' if args.quick else ''}.json"
    result["raw_results"] = str(path.relative_to(ROOT))
    path.write_text(json.dumps(result, indent=1, default=str))
    text = _report.markdown(result)
    print("\n" + text)
    print(f"raw results: {path.relative_to(ROOT)}")
    if record:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write("\n" + text)
        (HERE / "latest.json").write_text(json.dumps(_summary(result), indent=1, default=str))
        print("appended to benchmarks/RESULTS.md; wrote benchmarks/latest.json")


def run(args: argparse.Namespace, plan: dict[str, Any], dsn: str, db: str) -> dict[str, Any]:
    variants = [v for v in VARIANTS if v in args.variants]
    needed = set(variants) if "throughput" not in args.skip else set()
    if "overload" not in args.skip:
        needed |= set(OVERLOAD_VARIANTS) & set(DEFAULT_VARIANTS)
    if "reject" not in args.skip:
        needed |= set(REJECT_VARIANTS) & set(DEFAULT_VARIANTS)
    start_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    meta = _meta(dsn, db)
    workers = {v: Worker(v, dsn) for v in VARIANTS if v in needed}
    try:
        infos = {v: w.ask("info") for v, w in workers.items()}
        meta.update(_versions(infos))
        notes = _notes(infos, start_load)
        for note in notes:
            print("note:", note, flush=True)
        result: dict[str, Any] = {
            "meta": meta,
            "settings": {
                "mode": "quick" if args.quick else "full",
                "pool_size": POOL_SIZE,
                "concurrency": args.concurrency,
                "variants": variants,
                **plan,
            },
            "labels": {v: VARIANTS[v].label for v in VARIANTS},
            "workers": infos,
            "notes": notes,
        }
        throughput: dict[str, Any] = {"summary": {}}
        if "throughput" not in args.skip:
            raw = throughput_rounds(workers, variants, args.concurrency, plan)
            throughput = {"raw": raw, "summary": _report.summarise_throughput(raw, BASELINES)}
        result["throughput"] = throughput
        overload: dict[str, Any] = {"summary": {}}
        if "overload" not in args.skip:
            overload = overload_rounds(workers, plan)
            result["settings"]["overload"] = {
                "pool_size": POOL_SIZE,
                "max_overflow": MAX_OVERFLOW,
                "timeout": TIMEOUT,
                "tasks": TASKS,
                "hold": HOLD,
                "rounds": plan["overload_rounds"],
                "window": plan["overload_window"],
                "variants": list(OVERLOAD_VARIANTS),
                "labels": {
                    "sa": "SQLAlchemy AsyncAdaptedQueuePool",
                    "asyncpg": "asyncpg pool (max_size 30)",
                    "ap_default": "asyncpool (defaults, telemetry on: SDK)",
                    "ap_notel": "asyncpool (telemetry=False)",
                    "pg_sa": "SQLAlchemy AsyncAdaptedQueuePool on psycopg",
                    "pg_pool": "psycopg_pool AsyncConnectionPool (max_size 30)",
                    "pg_ap_default": "asyncpool on psycopg (defaults, telemetry on: SDK)",
                },
            }
        result["overload"] = overload
        reject: dict[str, Any] = {"summary": {}}
        if "reject" not in args.skip:
            reject = reject_rounds(workers, plan)
            result["settings"]["reject"] = {
                "pool_size": POOL_SIZE,
                "max_waiting": MAX_WAITING,
                "spike": SPIKE,
                "spikes": plan["spikes"],
                "rounds": plan["reject_rounds"],
            }
        result["reject"] = reject
    finally:
        for worker in workers.values():
            worker.close()
    if "inprocess" not in args.skip:
        result["inprocess"] = run_inprocess(dsn, plan["ab_rounds"])
    if args.soak:
        result["soak"] = run_soak(dsn, args.soak_checkouts)
    result["targets"] = _report.verdicts(
        result["throughput"]["summary"],
        overload["summary"],
        reject["summary"],
        result.get("soak"),
        result.get("inprocess"),
    )
    return result


def throughput_rounds(
    workers: dict[str, Worker], variants: list[str], concurrency: list[int], plan: dict[str, Any]
) -> list[dict[str, Any]]:
    raw: list[dict[str, Any]] = []
    rounds = plan["rounds"]
    for r in range(rounds):
        if r:
            # Each round in new processes: one process's memory layout and
            # hash seed would otherwise favour or handicap a variant for the
            # whole run by a few percent (as pyperf does, average over them).
            for variant in variants:
                workers[variant].restart()
        for conc in concurrency:
            shift = r % len(variants)
            order = variants[shift:] + variants[:shift]
            line = []
            for variant in order:
                cell = workers[variant].ask(
                    "throughput",
                    concurrency=conc,
                    warmup=plan["warmup"],
                    window=plan["window"],
                )
                raw.append({"variant": variant, "concurrency": conc, "round": r, **cell})
                line.append(f"{variant} {cell['ops_s']:,.0f}/s {cell['cpu_us_op']:.0f}us")
            print(f"round {r + 1}/{rounds} c{conc}: " + " | ".join(line), flush=True)
    return raw


def overload_rounds(workers: dict[str, Worker], plan: dict[str, Any]) -> dict[str, Any]:
    raw: list[dict[str, Any]] = []
    variants = [v for v in OVERLOAD_VARIANTS if v in workers]
    for r in range(plan["overload_rounds"]):
        shift = r % len(variants)
        order = variants[shift:] + variants[:shift]
        for variant in order:
            cell = workers[variant].ask(
                "overload", warmup=plan["overload_warmup"], window=plan["overload_window"]
            )
            raw.append({"variant": variant, "round": r, **cell})
            print(
                f"overload round {r + 1}: {variant}: {cell['ops_s']:,.0f} ops/s, wait p99 "
                f"{cell['wait_p99_ms']:.0f} ms, {cell['timeouts']} timeouts",
                flush=True,
            )
    metrics = (
        "ops_s",
        "timeouts",
        "wait_p50_ms",
        "wait_p95_ms",
        "wait_p99_ms",
        "wait_max_ms",
        "cpu_us_op",
    )
    return {"raw": raw, "summary": _report.summarise_rounds(raw, metrics)}


def reject_rounds(workers: dict[str, Worker], plan: dict[str, Any]) -> dict[str, Any]:
    raw: list[dict[str, Any]] = []
    variants = [v for v in REJECT_VARIANTS if v in workers]
    for r in range(plan["reject_rounds"]):
        shift = r % len(variants)
        order = variants[shift:] + variants[:shift]
        for variant in order:
            cell = workers[variant].ask("reject", spikes=plan["spikes"], gap=SPIKE_GAP)
            raw.append({"variant": variant, "round": r, **cell})
            print(
                f"reject round {r + 1}: {variant}: {cell['rejected']} rejected, p99 "
                f"{cell['reject_p99_ms']:.3f} ms (CPU {cell['reject_cpu_p99_ms']:.3f} ms), "
                f"max {cell['reject_max_ms']:.3f} ms",
                flush=True,
            )
    metrics = (
        "rejected",
        "served",
        "timeouts",
        "reject_p50_ms",
        "reject_p99_ms",
        "reject_max_ms",
        "reject_cpu_p50_ms",
        "reject_cpu_p99_ms",
        "answered_p99_ms",
    )
    return {"raw": raw, "summary": _report.summarise_rounds(raw, metrics)}


def run_inprocess(dsn: str, rounds: int) -> dict[str, Any]:
    """Run ``benchmarks/inprocess.py`` (telemetry on/off in one process) and keep its result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env[DSN_VARIABLE] = dsn  # not on the command line, where ps would show a password
    print(f"telemetry A/B in one process, {rounds} rounds ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ab.json"
        proc = subprocess.run(
            [
                sys.executable,
                str(HERE / "inprocess.py"),
                "--rounds",
                str(rounds),
                "--json",
                str(out),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not out.exists():
            return {"error": f"inprocess.py failed ({proc.returncode}): {proc.stderr[-300:]}"}
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def run_soak(dsn: str, checkouts: int) -> dict[str, Any]:
    """Run the memory soak of issue #5 (``benchmarks/soak.py``, not ours) and keep its figures."""
    if not SOAK.exists():
        return {"summary": "benchmarks/soak.py not present"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["DATABASE_URL"] = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    print(f"soak: {checkouts:,} checkouts through benchmarks/soak.py ...", flush=True)
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--checkouts", str(checkouts)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    figures = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("  ")
        if value.strip():
            figures[key.strip()] = value.strip()
    if proc.returncode != 0 or "peak growth" not in figures:
        return {"summary": f"soak.py failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"}
    figures["summary"] = (
        f"{figures.get('checkouts', '?')}: peak RSS growth {figures['peak growth']}, "
        f"second-half slope {figures.get('second-half slope', '?')}, "
        f"{figures.get('throughput', '?')}"
    )
    return figures


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result without raw cells (those stay in results/): what latest.json versions."""
    out = {k: v for k, v in result.items() if k != "workers"}
    for part in ("throughput", "overload", "reject"):
        if part in out:
            out[part] = {"summary": out[part].get("summary", {})}
    out["raw_results"] = result.get("raw_results")
    return out


# --------------------------------------------------------------- environment


def _meta(dsn: str, db: str) -> dict[str, Any]:
    return {
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postgresql": asyncio.run(_server_version(dsn)),
        "database": db,
        "asyncpool": _git_describe(),
        "load": f"loadavg start {_loadavg()}",
    }


def _machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    return f"{os.cpu_count()} x {model}{memory}, {platform.system()} {platform.release()}"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "-"


async def _server_version(dsn: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def _git_describe() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "asyncpool"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}{' + uncommitted changes in asyncpool/' if dirty else ''}"


def _versions(infos: dict[str, Any]) -> dict[str, str]:
    versions = package_versions()
    return {
        "sqlalchemy": versions["sqlalchemy"],
        "asyncpg": versions["asyncpg"],
        "psycopg": f"{versions['psycopg']}, psycopg-pool {versions['psycopg-pool']}",
        "greenlet": versions["greenlet"],
        "opentelemetry": (
            f"api {versions['opentelemetry-api']}, sdk {versions['opentelemetry-sdk']}"
        ),
        "telemetry": "; ".join(
            f"{v}: {i['telemetry']['meter_provider']}, observers "
            f"[{', '.join(i.get('observers', [])) or 'none'}]"
            for v, i in infos.items()
            if VARIANTS[v].kind == "asyncpool"
        ),
    }


#: A 1-minute load average above this before the run starts means other work is running.
BUSY_LOAD: Final = 0.7


def _notes(infos: dict[str, Any], load: float) -> list[str]:
    notes = []
    if load > BUSY_LOAD:
        notes.append(
            f"The machine was busy before this run started (load average {load:.2f} on "
            f"{os.cpu_count()} cores): other processes competed for the CPU, so absolute "
            "numbers and even paired ratios carry extra noise."
        )
    if any(i.get("telemetry_supported") is False for i in infos.values()):
        notes.append(
            "asyncpool has no telemetry yet (issue #4 not merged): the telemetry variants "
            "(ap_default, ap_noop) measure asyncpool WITHOUT telemetry; telemetry=False is "
            "not passed."
        )
    return notes


if __name__ == "__main__":
    main()
