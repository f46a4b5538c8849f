"""OpenTelemetry for asyncpool: pool metrics and checkout spans.

Every engine made by ``asyncpool.create_pooled_engine`` is instrumented once,
with the global providers: a no-op until the application installs an
OpenTelemetry SDK, and reporting from then on. ``instrument(engine, ...)``
re-instruments an engine with other providers or span settings;
``create_pooled_engine(..., telemetry=False)`` leaves it alone.

Metrics follow the semantic conventions for database client connection
pools (``semconv`` holds every name); checkout spans are recorded only for
checkouts worth a look. Only ``opentelemetry-api`` is needed here; the SDK
and exporters are the application's choice (extras ``otel``, ``prometheus``).
"""

from __future__ import annotations

import logging
from typing import Any, Final

from .. import engine as _engine
from . import semconv as semconv
from ._instrument import Instrumentation as Instrumentation
from ._instrument import SpanMode as SpanMode
from ._instrument import instrument as instrument

__all__ = ["Instrumentation", "SpanMode", "instrument", "semconv"]

logger = logging.getLogger("asyncpool.telemetry")


class _InstrumentNewEngines:
    """The ``create_pooled_engine`` hook: instrument each new engine with the defaults.

    ``is_telemetry`` lets ``create_pooled_engine(telemetry=False)`` skip it.
    Telemetry must never stop an application from starting, so a failure is
    logged, not raised.
    """

    is_telemetry: Final = True

    def __call__(self, engine: Any) -> None:
        try:
            instrument(engine)
        except Exception:
            logger.warning(
                "could not instrument %r; it runs without telemetry", engine, exc_info=True
            )


if not any(getattr(hook, "is_telemetry", False) for hook in _engine._engine_hooks):
    _engine._engine_hooks.append(_InstrumentNewEngines())
