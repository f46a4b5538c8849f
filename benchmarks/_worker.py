"""One benchmark worker process: one variant, driven over stdin/stdout.

``run.py`` starts one worker per variant and sends each, in turn, one JSON
command per line (``throughput``, ``overload``, ``reject``, ``info``,
``quit``); the worker answers one JSON line. Only one worker runs a cell at a
time (the others block reading stdin), so variants are interleaved without
competing for the CPU, and each keeps its own OpenTelemetry globals.

    BENCHMARK_DSN=postgresql://... python -m benchmarks._worker --variant ap_default
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import traceback
from typing import Any, Final, TextIO

#: Where the worker finds the database (asyncpg DSN form); kept off the command line.
DSN_VARIABLE: Final = "BENCHMARK_DSN"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True)
    args = parser.parse_args()

    from . import variants

    variant = variants.VARIANTS[args.variant]
    # Set up OpenTelemetry before asyncpool or SQLAlchemy is imported.
    from . import _otel_env

    telemetry = _otel_env.setup(variant.env)

    protocol: TextIO = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    dsn = os.environ[DSN_VARIABLE]
    target = variants.targets(dsn)

    for line in sys.stdin:
        command: dict[str, Any] = json.loads(line)
        name = command.pop("cmd")
        if name == "quit":
            break
        try:
            result = _dispatch(name, command, variant, target, telemetry)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


def _dispatch(
    name: str, command: dict[str, Any], variant: Any, target: dict[str, str], telemetry: Any
) -> Any:
    from . import variants

    if name == "info":
        return _info(variant, telemetry)
    if name == "throughput":
        return asyncio.run(
            variants.throughput_cell(
                variant,
                target,
                command["concurrency"],
                command["warmup"],
                command["window"],
                telemetry,
                checkout_only=command.get("checkout_only", False),
            )
        )
    if name == "overload":
        from .overload import overload_cell

        return asyncio.run(overload_cell(variant, target, command["warmup"], command["window"]))
    if name == "reject":
        from .reject import reject_cell

        return asyncio.run(reject_cell(variant, target, command["spikes"], command["gap"]))
    if name == "profile":
        from .hotpath import profile_cell

        return asyncio.run(profile_cell(variant, target, command["window"]))
    if name == "observer_micro":
        from .hotpath import observer_micro

        return asyncio.run(observer_micro(variant, target, command["calls"]))
    raise ValueError(f"unknown command {name!r}")


def package_versions() -> dict[str, str]:
    """The versions of what a benchmark measures, ``-`` where not installed."""
    from importlib import metadata

    versions = {}
    for dist in (
        "sqlalchemy",
        "asyncpg",
        "psycopg",
        "psycopg-pool",
        "greenlet",
        "opentelemetry-api",
        "opentelemetry-sdk",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "-"
    return versions


def _info(variant: Any, telemetry: Any) -> dict[str, Any]:
    from . import variants

    info: dict[str, Any] = {
        "variant": variant.name,
        "label": variant.label,
        "versions": package_versions(),
        "telemetry": telemetry.describe(),
    }
    if variant.kind == "asyncpool":
        import asyncpool

        info["asyncpool_file"] = asyncpool.__file__
        info["telemetry_supported"] = variants.telemetry_supported()
        info["options"] = variants.asyncpool_options(variant)
        info["observers"] = _observers(variant)
    return info


def _observers(variant: Any) -> list[str]:
    """The pool observers a fresh engine of this variant gets (telemetry's hot-path hooks)."""
    from asyncpool.engine import pool_of

    from . import variants

    async def look() -> list[str]:
        subject = await variants.open_subject(variant, variants.targets("postgresql://u@/db"))
        try:
            return [_describe(o) for o in pool_of(subject.engine).state.observers]
        finally:
            await subject.close()

    return asyncio.run(look())


def _describe(observer: Any) -> str:
    """An observer's class, and for PoolTelemetry which histogram path it records through."""
    name = type(observer).__name__
    record = getattr(observer, "_record_wait", None)
    if record is not None:
        name += "(bound histograms)" if hasattr(record, "bound") else "(public record)"
    return name


if __name__ == "__main__":
    main()
