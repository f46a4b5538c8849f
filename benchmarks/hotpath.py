"""Where asyncpool's per-checkout time goes, with and without telemetry.

    python benchmarks/hotpath.py            # embedded PostgreSQL
    python benchmarks/hotpath.py --url postgresql://...

Three measurements, each variant in its own worker process (see run.py):

1. **Checkout-only CPU**: ``async with engine.connect(): pass`` at
   concurrency 10, interleaved rounds. Nothing is sent to the server, so the
   CPU per cycle is the pool's own cost (SQLAlchemy's facade and greenlet
   bridge, the pool, and telemetry); differences between variants are the
   cost of what differs, in microseconds per checkout.
2. **Observer calls**: each registered ``PoolObserver`` method called in a
   tight loop (ns per call): the telemetry cost without any pool around it.
3. **cProfile** of the ``SELECT 1`` loop and the checkout-only loop:
   self time grouped by component, and the most expensive functions of
   asyncpool and OpenTelemetry with their calls per op. cProfile inflates
   Python calls, so read these as shares, and the checkout-only CPU as
   the absolute cost.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Path fragments -> component, first match wins (self time is grouped by these).
COMPONENTS: Final = (
    ("asyncpool/telemetry", "asyncpool telemetry"),
    ("asyncpool/", "asyncpool pool"),
    ("opentelemetry/sdk/metrics", "OTel SDK metrics"),
    ("opentelemetry/sdk/trace", "OTel SDK trace"),
    ("opentelemetry/sdk", "OTel SDK other"),
    ("opentelemetry/attributes", "OTel attributes"),
    ("opentelemetry/context", "OTel context"),
    ("opentelemetry/", "OTel API"),
    ("sqlalchemy/pool", "SA pool"),
    ("sqlalchemy/ext/asyncio", "SA asyncio facade"),
    ("sqlalchemy/util/concurrency", "SA greenlet bridge"),
    ("sqlalchemy/util/_concurrency", "SA greenlet bridge"),
    ("sqlalchemy/dialects", "SA asyncpg adapter"),
    ("sqlalchemy/event", "SA event dispatch"),
    ("sqlalchemy/engine", "SA engine"),
    ("sqlalchemy/sql", "SA sql"),
    ("sqlalchemy/", "SA other"),
    ("asyncpg/", "asyncpg"),
    ("asyncio/", "asyncio loop"),
    ("greenlet", "greenlet"),
)

#: Functions from these path fragments are listed one by one.
DETAIL: Final = ("asyncpool/", "opentelemetry/")


def component(filename: str, funcname: str) -> str:
    if filename == "~":  # a builtin
        if "greenlet" in funcname or "switch" in funcname:
            return "greenlet switch (C)"
        if "socket" in funcname or "send" in funcname or "recv" in funcname:
            return "socket I/O (C)"
        return "builtins (C)"
    for fragment, name in COMPONENTS:
        if fragment in filename:
            return name
    return "other: " + Path(filename).name


async def profile_loop(subject: Any, checkout_only: bool, window: float) -> dict[str, Any]:
    """cProfile ``window`` seconds of the closed loop at concurrency 10."""
    from .variants import closed_loop

    op = subject.checkout if checkout_only else subject.op
    await closed_loop(op, 10, 0.2, 0.2)  # warm up outside the profile
    profiler = cProfile.Profile()
    profiler.enable()
    result = await closed_loop(op, 10, 0.0, window)
    profiler.disable()
    ops = result["ops"] or 1
    stats: Any = pstats.Stats(profiler)  # .stats: the raw table (untyped in typeshed)
    groups: dict[str, float] = {}
    calls = 0
    details: list[dict[str, Any]] = []
    for (filename, _line, funcname), row in stats.stats.items():
        _cc, ncalls, tottime, cumtime, _callers = row
        calls += ncalls
        name = component(filename, funcname)
        groups[name] = groups.get(name, 0.0) + tottime
        if any(fragment in filename for fragment in DETAIL):
            short = filename.split("site-packages/")[-1].split("/work/main/")[-1]
            details.append(
                {
                    "function": f"{short}:{funcname}",
                    "calls_per_op": ncalls / ops,
                    "self_us_op": 1e6 * tottime / ops,
                    "cum_us_op": 1e6 * cumtime / ops,
                }
            )
    total = sum(groups.values())
    details.sort(key=lambda d: -d["self_us_op"])
    return {
        "ops": result["ops"],
        "profiled_us_op": 1e6 * total / ops,
        "calls_per_op": calls / ops,
        "components": {k: 1e6 * v / ops for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "functions": details[:30],
    }


async def profile_cell(variant: Any, target: dict[str, str], window: float) -> dict[str, Any]:
    from .variants import open_subject

    gc.collect()
    subject = await open_subject(variant, target)
    try:
        return {
            "select": await profile_loop(subject, False, window),
            "checkout": await profile_loop(subject, True, window),
        }
    finally:
        await subject.close()


async def observer_micro(variant: Any, target: dict[str, str], calls: int) -> dict[str, Any]:
    """ns per call of every observer method registered on the pool (none: empty)."""
    from asyncpool.engine import pool_of

    from .variants import open_subject

    subject = await open_subject(variant, target)
    try:
        await subject.op()
        if variant.kind != "asyncpool":
            return {}
        observers = pool_of(subject.engine).state.observers
        out: dict[str, Any] = {"observers": [type(o).__qualname__ for o in observers]}
        error = TimeoutError("bench")
        for observer in observers:
            prefix = type(observer).__name__
            cases = {
                "checked_out(wait, waited=False)": lambda o=observer: o.checked_out(
                    0.0001, False, None
                ),
                "checked_out(wait, waited=True)": lambda o=observer: o.checked_out(
                    0.003, True, None
                ),
                "checked_in(use)": lambda o=observer: o.checked_in(0.0004),
                "checkout_failed(wait, error)": lambda o=observer: o.checkout_failed(0.0, error),
            }
            for label, call in cases.items():
                out[f"{prefix}.{label}"] = _ns_per_call(call, calls)
        out["baseline: empty lambda"] = _ns_per_call(lambda: None, calls)
        return out
    finally:
        await subject.close()


def _ns_per_call(call: Any, calls: int) -> float:
    """Median over 5 runs of the thread CPU ns one call takes (loop overhead included).

    Thread CPU time, not wall time: being descheduled on a busy machine does
    not count.
    """
    samples = []
    for _ in range(5):
        started = time.thread_time_ns()
        for _ in range(calls):
            call()
        samples.append((time.thread_time_ns() - started) / calls)
    return statistics.median(samples)


def primitives(calls: int) -> dict[str, float]:
    """ns per call of the OpenTelemetry primitives a checkout could use, and the alternatives.

    Private providers (nothing global is set). The attribute dict is built
    once, as asyncpool's observer does: one key, the pool name; the
    histogram has explicit buckets. The "SDK-private" line feeds the SDK's
    own aggregation object directly (what a fast path around the public
    ``record()`` would cost); it relies on SDK internals and is shown for
    the size of the gap only.
    """
    import bisect

    from opentelemetry.context import Context
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.metrics import _internal as metrics_internal
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics._internal.exemplar import AlwaysOffExemplarFilter
    from opentelemetry.sdk.metrics._internal.measurement import Measurement
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    attrs = {"db.client.connection.pool.name": "bench"}
    attrs2 = {**attrs, "db.system.name": "postgresql"}
    bounds = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    meter = provider.get_meter("bench")
    hist: Any = meter.create_histogram("h", unit="s", explicit_bucket_boundaries_advisory=bounds)
    counter = meter.create_counter("c")
    quiet = MeterProvider(
        metric_readers=[InMemoryMetricReader()], exemplar_filter=AlwaysOffExemplarFilter()
    ).get_meter("bench")
    quiet_hist = quiet.create_histogram("h", unit="s", explicit_bucket_boundaries_advisory=bounds)
    noop_hist = NoOpMeterProvider().get_meter("bench").create_histogram("h")
    proxy_hist = metrics_internal._ProxyMeter("bench").create_histogram("h")
    counts = [0] * (len(bounds) + 1)
    total = [0.0]
    buffer: list[float] = []
    tracer = TracerProvider().get_tracer("bench")

    hist.record(0.0042, attrs)  # creates the aggregation for this attribute set
    storage = next(iter(provider._measurement_consumer._reader_storages.values()))
    matches = next(iter(storage._instrument_view_instrument_matches.values()))
    aggregation = next(iter(matches[0]._attributes_aggregation.values()))
    context = Context()
    measurement = Measurement(0.0042, 0, hist, context, attrs)

    def preaggregate(v: float = 0.0042) -> None:
        counts[bisect.bisect_left(bounds, v)] += 1
        total[0] += v

    def buffered(v: float = 0.0042) -> None:
        buffer.append(v)
        if len(buffer) > 4096:
            buffer.clear()

    out = {
        "time.perf_counter()": _ns_per_call(time.perf_counter, calls),
        "SDK Histogram.record(v, 1 attribute) (asyncpool's call)": _ns_per_call(
            lambda: hist.record(0.0042, attrs), calls
        ),
        "SDK Histogram.record(v, 2 attributes)": _ns_per_call(
            lambda: hist.record(0.0042, attrs2), calls
        ),
        "SDK Histogram.record(v, 1 attribute), exemplar filter always_off": _ns_per_call(
            lambda: quiet_hist.record(0.0042, attrs), calls
        ),
        "SDK Histogram.record(v) no attributes": _ns_per_call(lambda: hist.record(0.0042), calls),
        "SDK Counter.add(1, 1 attribute)": _ns_per_call(lambda: counter.add(1, attrs), calls),
        "SDK-private: Measurement(...) construction alone": _ns_per_call(
            lambda: Measurement(0.0042, 0, hist, context, attrs), calls
        ),
        "SDK-private: aggregation.aggregate(prebuilt measurement)": _ns_per_call(
            lambda: aggregation.aggregate(measurement, False), calls
        ),
        "API no-op Histogram.record": _ns_per_call(lambda: noop_hist.record(0.0042, attrs), calls),
        "API proxy Histogram.record (global unset)": _ns_per_call(
            lambda: proxy_hist.record(0.0042, attrs), calls
        ),
        "local pre-aggregation (bisect + bucket increment + sum)": _ns_per_call(
            preaggregate, calls
        ),
        "local buffer (list.append, drained at collection)": _ns_per_call(buffered, calls),
    }
    from asyncpool.telemetry._bound import BoundHistogram

    bound = BoundHistogram(hist, attrs)
    bound(0.0042)  # binds: mode "local"
    out["asyncpool BoundHistogram, local (pre-aggregated, merged at collection)"] = _ns_per_call(
        lambda: bound(0.0042), calls
    )
    with tracer.start_as_current_span("request"):
        out["SDK Histogram.record(v, 1 attribute) inside a sampled span (exemplar kept)"] = (
            _ns_per_call(lambda: hist.record(0.0042, attrs), calls)
        )
        out["asyncpool BoundHistogram inside a sampled span (direct, exemplar kept)"] = (
            _ns_per_call(lambda: bound(0.0042), calls)
        )
    out["baseline: empty lambda"] = _ns_per_call(lambda: None, calls)
    return out


# ------------------------------------------------------------------ driver

VARIANTS_PROFILED: Final = ("sa", "ap_notel", "ap_noop", "ap_unset", "ap_default")


def main() -> None:
    from benchmarks._report import paired_ratios
    from benchmarks._stats import spread
    from benchmarks.run import Worker, database

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--window", type=float, default=0.7)
    parser.add_argument("--profile-window", type=float, default=2.0)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--json", type=Path, help="write everything here too")
    args = parser.parse_args()

    out: dict[str, Any] = {}
    with database(args.url) as (dsn, _description):
        workers = {v: Worker(v, dsn) for v in VARIANTS_PROFILED}
        try:
            raw: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in workers}
            for r in range(args.rounds):
                order = list(workers)[r % len(workers) :] + list(workers)[: r % len(workers)]
                for v in order:
                    raw[v][r] = workers[v].ask(
                        "throughput",
                        concurrency=10,
                        warmup=0.2,
                        window=args.window,
                        checkout_only=True,
                    )
            print("\n## Checkout-only CPU per cycle (c10, `async with engine.connect(): pass`)\n")
            print("| variant | CPU us/cycle | vs ap_notel (paired) | extra us/cycle |")
            print("|---|--:|--:|--:|")
            base = spread([c["cpu_us_op"] for c in raw["ap_notel"].values()])["median"]
            checkout: dict[str, Any] = {}
            for v, rounds in raw.items():
                cpu = spread([c["cpu_us_op"] for c in rounds.values()])
                ratio = paired_ratios(rounds, raw["ap_notel"])["cpu_us_op"]
                checkout[v] = {"cpu_us_op": cpu, "vs_ap_notel": ratio}
                print(
                    f"| {v} | {cpu['median']:.1f} ({cpu['min']:.1f}-{cpu['max']:.1f}) | "
                    f"{ratio['median']:.3f} ({ratio['min']:.2f}-{ratio['max']:.2f}) | "
                    f"{cpu['median'] - base:+.1f} |"
                )
            out["checkout_only"] = checkout
            out["observer_micro"] = {}
            out["profile"] = {}
            for v, worker in workers.items():
                out["observer_micro"][v] = worker.ask("observer_micro", calls=args.calls)
                out["profile"][v] = worker.ask("profile", window=args.profile_window)
        finally:
            for worker in workers.values():
                worker.close()
    out["primitives"] = primitives(args.calls)
    print("\n## OpenTelemetry primitives and alternatives (thread CPU ns per call, median of 5)\n")
    for label, ns in out["primitives"].items():
        print(f"- {label}: {ns:,.0f} ns")
    print("\n## Observer calls (thread CPU ns per call, tight loop, median of 5)\n")
    for v, micro in out["observer_micro"].items():
        for label, ns in micro.items():
            if label != "observers":
                print(f"- {v}: {label}: {ns:,.0f} ns")
    for v, prof in out["profile"].items():
        for kind in ("select", "checkout"):
            p = prof[kind]
            print(
                f"\n## cProfile {v}, {kind} loop c10: {p['ops']} ops, "
                f"{p['profiled_us_op']:.0f} us profiled/op, {p['calls_per_op']:.0f} calls/op\n"
            )
            print("| component | us/op (profiled) |\n|---|--:|")
            for name, us in list(p["components"].items())[:14]:
                print(f"| {name} | {us:.1f} |")
            if p["functions"]:
                print("\n| function | calls/op | self us/op | cum us/op |\n|---|--:|--:|--:|")
                for f in p["functions"][:15]:
                    print(
                        f"| {f['function']} | {f['calls_per_op']:.2f} | "
                        f"{f['self_us_op']:.2f} | {f['cum_us_op']:.2f} |"
                    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
