"""The OpenTelemetry setting of one benchmark worker process.

OpenTelemetry's global providers can be set only once per process, so each
variant runs in its own worker process and sets its environment up before
anything else is imported:

* ``plain``: nothing is touched; the API's global providers stay the default
  (no-op) ones. Variants here either have no telemetry or turn it off.
* ``sdk``: the SDK's ``MeterProvider`` (an ``InMemoryMetricReader``) and
  ``TracerProvider`` (``SimpleSpanProcessor`` into an exporter that counts
  spans by name and drops them) are installed globally, as an application
  with OpenTelemetry set up would. Dropping, not keeping, the spans keeps
  the heap from growing over a run (which would bill the garbage collector
  to whichever variant runs late); a real exporter does more work than this,
  so span costs measured here are a lower bound.
* ``noop``: the SDK cannot even be imported (an import hook refuses it), so
  the code under test can only reach the API's no-op implementation, as on a
  machine without ``opentelemetry-sdk``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

ENVS: Final = ("plain", "sdk", "noop")

_SDK: Final = "opentelemetry.sdk"


class _RefuseSDK(importlib.abc.MetaPathFinder):
    """An import hook that makes ``opentelemetry.sdk`` look uninstalled."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == _SDK or fullname.startswith(_SDK + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (no-SDK benchmark variant)")
        return None


@dataclass
class Telemetry:
    """What the worker's OpenTelemetry setup left behind, to read after a cell."""

    env: str
    metric_reader: Any = None
    span_exporter: Any = None
    _collected: Any = None
    _collect_ms: float = float("nan")

    def describe(self) -> dict[str, str]:
        from opentelemetry import metrics, trace

        return {
            "env": self.env,
            "meter_provider": type(metrics.get_meter_provider()).__name__,
            "tracer_provider": type(trace.get_tracer_provider()).__name__,
            "sdk_importable": str(_sdk_importable()),
        }

    def collect(self) -> None:
        """Collect the metrics now, as a periodic exporter would (timed, kept for harvest).

        Called inside the measured window, so work that telemetry defers
        from the checkout to collection time is still billed to the variant.
        """
        if self.metric_reader is None:
            return
        started = time.perf_counter()
        self._collected = self.metric_reader.get_metrics_data()
        self._collect_ms = 1000 * (time.perf_counter() - started)

    def harvest(self, pool_name: str) -> dict[str, Any]:
        """Summarise the last collection for ``pool_name``, then forget the spans.

        Histograms give their count, sums their value, gauges their last value;
        only data points with ``pool_name`` among their attribute values count.
        Proves that the telemetry variant really recorded something.
        """
        out: dict[str, Any] = {}
        if self.metric_reader is not None:
            out["collect_ms"] = round(self._collect_ms, 3)
            out["metrics"] = _summarise(self._collected, pool_name)
            self._collected = None
        if self.span_exporter is not None:
            out["spans"] = dict(self.span_exporter.counts)
            self.span_exporter.counts.clear()
        return out


def setup(env: str) -> Telemetry:
    """Prepare this process for ``env``; call before importing asyncpool or SQLAlchemy."""
    if env not in ENVS:
        raise ValueError(f"unknown telemetry environment {env!r}; one of {ENVS}")
    if env == "noop":
        if any(name == _SDK or name.startswith(_SDK + ".") for name in sys.modules):
            raise RuntimeError("opentelemetry.sdk was imported before the no-SDK hook")
        sys.meta_path.insert(0, _RefuseSDK())
        return Telemetry(env)
    if env == "plain":
        return Telemetry(env)
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    exporter = _counting_exporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(tracer_provider)
    return Telemetry(env, metric_reader=reader, span_exporter=exporter)


def _counting_exporter() -> Any:
    """A span exporter that counts finished spans by name and keeps nothing else."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class CountingSpanExporter(SpanExporter):
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            for span in spans:
                self.counts[span.name] = self.counts.get(span.name, 0) + 1
            return SpanExportResult.SUCCESS

    return CountingSpanExporter()


def _sdk_importable() -> bool:
    """Whether the SDK could be imported here (asks the import system, imports nothing)."""
    try:
        return importlib.util.find_spec(_SDK) is not None
    except ImportError:
        return False


def _summarise(data: Any, pool_name: str) -> dict[str, float]:
    summary: dict[str, float] = {}
    if data is None:
        return summary
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    if pool_name not in {str(v) for v in (point.attributes or {}).values()}:
                        continue
                    if hasattr(point, "count"):  # histogram
                        value = float(point.count)
                    else:
                        value = float(point.value)
                    summary[metric.name] = summary.get(metric.name, 0.0) + value
    return summary
