"""Which OpenTelemetry providers are real, decided once at instrument time.

The API hands out three kinds of provider: a real one (the SDK's, installed
by the application), an explicit no-op one, and, while the application has
not installed anything yet, the global *proxy*, which turns real the moment
an SDK is installed. Telemetry costs nothing only if the pool gets no
observer at all, so this module tells the three apart:

* ``REAL``: instrument now.
* ``NOOP``: nothing can ever be recorded; register nothing.
* ``UNSET``: the global proxy while the SDK *could* still be installed later;
  asyncpool waits for it cheaply (see ``_observer.Pending``). When the SDK is
  not even importable, an unset global can never become real, so it counts as
  ``NOOP``.
"""

from __future__ import annotations

import enum
import importlib.util
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import _internal as _metrics_internal

__all__ = ["GlobalsWatch", "Kind", "meter_provider_kind", "tracer_provider_kind"]

#: The API module holding the global meter provider (typed loosely: private names).
_METRICS_STATE: Any = _metrics_internal

_sdk_importable: bool | None = None


class Kind(enum.Enum):
    REAL = "real"
    NOOP = "noop"
    UNSET = "unset"


def meter_provider_kind(provider: metrics.MeterProvider | None) -> Kind:
    """Classify ``provider`` (``None``: the global one)."""
    if provider is None:
        provider = metrics.get_meter_provider()
    if isinstance(provider, metrics.NoOpMeterProvider):
        return Kind.NOOP
    if isinstance(provider, _metrics_internal._ProxyMeterProvider):
        return _unset_or_noop()
    return Kind.REAL


def tracer_provider_kind(provider: trace.TracerProvider | None) -> Kind:
    """Classify ``provider`` (``None``: the global one)."""
    if provider is None:
        provider = trace.get_tracer_provider()
    if isinstance(provider, trace.NoOpTracerProvider):
        return Kind.NOOP
    if isinstance(provider, trace.ProxyTracerProvider):
        return _unset_or_noop()
    return Kind.REAL


class GlobalsWatch:
    """Tells whether the application installed a global provider since it was made.

    Reads the API's module globals directly: this runs on checkouts while
    telemetry waits for the SDK, where ``get_meter_provider()`` (which also
    consults the environment) would cost several times more.
    """

    __slots__ = ("_meter_unset", "_tracer_unset")

    def __init__(self) -> None:
        self._meter_unset = _METRICS_STATE._METER_PROVIDER is None
        self._tracer_unset = trace._TRACER_PROVIDER is None

    def changed(self) -> bool:
        return (_METRICS_STATE._METER_PROVIDER is None) is not self._meter_unset or (
            trace._TRACER_PROVIDER is None
        ) is not self._tracer_unset


def _unset_or_noop() -> Kind:
    global _sdk_importable
    if _sdk_importable is None:
        try:
            _sdk_importable = importlib.util.find_spec("opentelemetry.sdk") is not None
        except (ImportError, ValueError):
            _sdk_importable = False
    return Kind.UNSET if _sdk_importable else Kind.NOOP
