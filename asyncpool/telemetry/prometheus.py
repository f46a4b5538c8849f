"""A ``/metrics`` view for Prometheus, fed by the same OpenTelemetry metrics.

The pool metrics are OpenTelemetry instruments; Prometheus gets them through
the official ``opentelemetry-exporter-prometheus`` reader, which publishes a
``MeterProvider``'s metrics into a ``prometheus_client`` registry, and this
module serves that registry over HTTP. One pipeline feeds OTLP and
Prometheus alike, so the numbers agree. Names follow the exporter's mapping:
dots become underscores, ``s`` adds ``_seconds``, counters end in ``_total``
(``db.client.connection.wait_time`` -> ``db_client_connection_wait_time_seconds``).

Install with the ``prometheus`` extra. Wiring::

    from asyncpool.telemetry.prometheus import create_metric_reader, metrics_route

    metrics.set_meter_provider(MeterProvider(metric_readers=[create_metric_reader()]))
    app = Starlette(routes=[metrics_route()])       # or FastAPI: app.router.routes.append(...)

Collecting runs the pool callbacks on the event loop that serves the
request, the loop that owns the pools.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from starlette.routing import Route

__all__ = ["MetricsApp", "create_metric_reader", "metrics_route"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ALLOWED: Final = ("GET", "HEAD")


def create_metric_reader(
    registry: CollectorRegistry | None = None, **options: Any
) -> PrometheusMetricReader:
    """A metric reader that publishes a ``MeterProvider``'s metrics into ``registry``.

    Give it to ``MeterProvider(metric_readers=[...])``; ``registry`` defaults
    to ``prometheus_client.REGISTRY``. ``options`` go to
    ``PrometheusMetricReader`` (``disable_target_info``, ``prefix``, ...).
    """
    return PrometheusMetricReader(
        registry=registry if registry is not None else REGISTRY, **options
    )


class MetricsApp:
    """An ASGI app serving a ``prometheus_client`` registry (text format, or
    OpenMetrics when the scraper asks for it). Mount it anywhere, or use
    ``metrics_route()``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else REGISTRY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served on its own (uvicorn app)
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] not in _ALLOWED:
            await _respond(send, 405, b"Method Not Allowed\n", "text/plain", allow=True)
            return
        accept = ""
        for name, value in scope.get("headers", ()):
            if name == b"accept":
                accept = value.decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        if scope["method"] == "HEAD":
            body = b""
        await _respond(send, 200, body, content_type)


def metrics_route(path: str = "/metrics", registry: CollectorRegistry | None = None) -> Route:
    """A Starlette ``Route`` serving ``registry`` at ``path`` (FastAPI accepts it too)."""
    from starlette.routing import Route

    return Route(path, MetricsApp(registry), methods=list(_ALLOWED))


async def _respond(
    send: Send, status: int, body: bytes, content_type: str, *, allow: bool = False
) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
    ]
    if allow:
        headers.append((b"allow", ", ".join(_ALLOWED).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
