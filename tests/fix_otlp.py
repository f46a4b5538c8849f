"""OpenTelemetry fixtures: SDK in-memory readers, and a real OTLP receiver on loopback.

``otel``: a fresh SDK ``MeterProvider`` (``InMemoryMetricReader``) and
``TracerProvider`` (``InMemorySpanExporter``) per test, never installed
globally (the global providers can be set only once per process), plus
helpers to find metric points by name and pool.

``otlp_receiver``: the OTLP collector gRPC services from ``opentelemetry-proto``
served with grpcio on 127.0.0.1 (a free port), keeping every export request
it receives; stopped at the end of the test.

``otlp_http_receiver``: the same over OTLP/HTTP with binary protobuf
(``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``): a small HTTP server on
127.0.0.1 taking ``POST /v1/metrics`` and ``POST /v1/traces`` with
``Content-Type: application/x-protobuf`` (gzip or not), decoding each body
as ``ExportMetricsServiceRequest`` / ``ExportTraceServiceRequest``. Anything
else (another path, JSON, a body that does not decode) is refused with the
status the OTLP specification gives, and recorded in ``refused``.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from asyncpool.telemetry import semconv as sc

# ------------------------------------------------------------ in-memory SDK


class _SpanCount(SpanProcessor):
    """Counts spans started and ended: a span left open shows as a difference."""

    def __init__(self) -> None:
        self.started = self.ended = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started += 1

    def on_end(self, span: Any) -> None:
        self.ended += 1


class Otel:
    """SDK providers with in-memory readers, and lookups over what they recorded."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.span_exporter = InMemorySpanExporter()
        self.span_count = _SpanCount()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(self.span_count)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.span_exporter))
        self.tracer = self.tracer_provider.get_tracer("tests")

    def collect(self) -> dict[str, Metric]:
        """Collect now (runs the observable callbacks): metrics by name."""
        data = self.reader.get_metrics_data()
        found: dict[str, Metric] = {}
        if data is None:
            return found
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    found[metric.name] = metric
        return found

    @staticmethod
    def points(metrics: dict[str, Metric], name: str, pool: str) -> list[Any]:
        """Data points of ``name`` for ``pool`` (empty when none were recorded)."""
        metric = metrics.get(name)
        if metric is None:
            return []
        return [
            p
            for p in metric.data.data_points
            if p.attributes.get(sc.DB_CLIENT_CONNECTION_POOL_NAME) == pool
        ]

    def value(self, metrics: dict[str, Metric], name: str, pool: str, **attributes: Any) -> Any:
        """The value of the single point of ``name`` for ``pool`` matching ``attributes``
        (dots in attribute names spelt as ``__``); 0 when there is none."""
        wanted = {k.replace("__", "."): v for k, v in attributes.items()}
        matching = [
            p
            for p in self.points(metrics, name, pool)
            if all(p.attributes.get(k) == v for k, v in wanted.items())
        ]
        assert len(matching) <= 1, matching
        return matching[0].value if matching else 0

    def histogram(self, metrics: dict[str, Metric], name: str, pool: str) -> Any:
        (point,) = self.points(metrics, name, pool)
        return point

    def spans(self, pool: str | None = None) -> list[ReadableSpan]:
        """Finished checkout spans (of ``pool``)."""
        return [
            s
            for s in self.span_exporter.get_finished_spans()
            if s.name == sc.CHECKOUT_SPAN_NAME
            and (
                pool is None or (s.attributes or {}).get(sc.DB_CLIENT_CONNECTION_POOL_NAME) == pool
            )
        ]

    @property
    def open_spans(self) -> int:
        return self.span_count.started - self.span_count.ended

    def shutdown(self) -> None:
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    providers = Otel()
    yield providers
    providers.shutdown()


# ------------------------------------------------------------ OTLP receiver


@dataclass
class OtlpReceiver:
    """What a real OTLP/gRPC endpoint received."""

    endpoint: str
    protocol: str = "grpc"
    metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(
        default_factory=list
    )
    trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Requests the HTTP receiver refused: (path, content type, status).
    refused: list[tuple[str, str, int]] = field(default_factory=list)

    def metrics(self) -> list[Any]:
        """Every ``opentelemetry.proto.metrics.v1.Metric`` received, in arrival order."""
        with self.lock:
            return [
                metric
                for request in self.metric_requests
                for resource_metrics in request.resource_metrics
                for scope_metrics in resource_metrics.scope_metrics
                for metric in scope_metrics.metrics
            ]

    def spans(self) -> list[Any]:
        """Every ``opentelemetry.proto.trace.v1.Span`` received."""
        with self.lock:
            return [
                span
                for request in self.trace_requests
                for resource_spans in request.resource_spans
                for scope_spans in resource_spans.scope_spans
                for span in scope_spans.spans
            ]


def attributes_of(item: Any) -> dict[str, Any]:
    """A proto message's ``attributes`` (a list of KeyValue) as a plain dict."""
    return {kv.key: any_value(kv.value) for kv in item.attributes}


def any_value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method name
        with self.receiver.lock:
            self.receiver.metric_requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method name
        with self.receiver.lock:
            self.receiver.trace_requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    port = server.add_insecure_port("127.0.0.1:0")
    receiver = OtlpReceiver(endpoint=f"http://127.0.0.1:{port}")
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(receiver), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver), server)
    server.start()
    try:
        yield receiver
    finally:
        server.stop(grace=None).wait(5)


# ------------------------------------------------------------ OTLP/HTTP receiver

#: OTLP/HTTP paths -> (request message, response message, where the receiver keeps it).
_HTTP_SIGNALS: dict[str, tuple[Any, Any, str]] = {
    "/v1/metrics": (
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
        "metric_requests",
    ),
    "/v1/traces": (
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
        "trace_requests",
    ),
}

_PROTOBUF = "application/x-protobuf"


class _OtlpHttpHandler(BaseHTTPRequestHandler):
    """``POST /v1/metrics`` and ``/v1/traces`` in binary protobuf, as the OTLP spec has it."""

    server: _OtlpHttpServer

    def do_POST(self) -> None:  # the http.server method name
        receiver = self.server.receiver
        path = self.path.split("?", 1)[0]
        content_type = self.headers.get("Content-Type", "")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        signal = _HTTP_SIGNALS.get(path)
        if signal is None:
            self._refuse(path, content_type, 404)
            return
        if content_type.split(";", 1)[0].strip() != _PROTOBUF:
            self._refuse(path, content_type, 415)
            return
        request_type, response_type, kept_in = signal
        try:
            encoding = self.headers.get("Content-Encoding", "").strip().lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            request = request_type.FromString(body)
        except Exception:
            self._refuse(path, content_type, 400)
            return
        with receiver.lock:
            getattr(receiver, kept_in).append(request)
        self._reply(200, response_type().SerializeToString())

    def _refuse(self, path: str, content_type: str, status: int) -> None:
        with self.server.receiver.lock:
            self.server.receiver.refused.append((path, content_type, status))
        self._reply(status, b"")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", _PROTOBUF)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test asserts on what was received, not on an access log."""


class _OtlpHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: OtlpReceiver) -> None:
        super().__init__(("127.0.0.1", 0), _OtlpHttpHandler)
        self.receiver = receiver


@pytest.fixture
def otlp_http_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver(endpoint="", protocol="http/protobuf")
    server = _OtlpHttpServer(receiver)
    receiver.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="otlp-http", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
