"""asyncpool's telemetry names against the opentelemetry-semantic-conventions package."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics import _internal as sdk_metrics
from opentelemetry.semconv._incubating.attributes import db_attributes as incubating_db
from opentelemetry.semconv._incubating.metrics import db_metrics
from opentelemetry.semconv.attributes import (
    db_attributes,
    error_attributes,
    exception_attributes,
    server_attributes,
)

from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry._instruments import SPECS, PoolInstruments

#: Our constant -> the conventions' constant and the helper that creates the instrument.
CONVENTION_METRICS: dict[str, tuple[str, Callable[..., Any]]] = {
    sc.DB_CLIENT_CONNECTION_COUNT: (
        db_metrics.DB_CLIENT_CONNECTION_COUNT,
        db_metrics.create_db_client_connection_count,
    ),
    sc.DB_CLIENT_CONNECTION_IDLE_MAX: (
        db_metrics.DB_CLIENT_CONNECTION_IDLE_MAX,
        db_metrics.create_db_client_connection_idle_max,
    ),
    sc.DB_CLIENT_CONNECTION_IDLE_MIN: (
        db_metrics.DB_CLIENT_CONNECTION_IDLE_MIN,
        db_metrics.create_db_client_connection_idle_min,
    ),
    sc.DB_CLIENT_CONNECTION_MAX: (
        db_metrics.DB_CLIENT_CONNECTION_MAX,
        db_metrics.create_db_client_connection_max,
    ),
    sc.DB_CLIENT_CONNECTION_PENDING_REQUESTS: (
        db_metrics.DB_CLIENT_CONNECTION_PENDING_REQUESTS,
        db_metrics.create_db_client_connection_pending_requests,
    ),
    sc.DB_CLIENT_CONNECTION_TIMEOUTS: (
        db_metrics.DB_CLIENT_CONNECTION_TIMEOUTS,
        db_metrics.create_db_client_connection_timeouts,
    ),
    sc.DB_CLIENT_CONNECTION_CREATE_TIME: (
        db_metrics.DB_CLIENT_CONNECTION_CREATE_TIME,
        db_metrics.create_db_client_connection_create_time,
    ),
    sc.DB_CLIENT_CONNECTION_WAIT_TIME: (
        db_metrics.DB_CLIENT_CONNECTION_WAIT_TIME,
        db_metrics.create_db_client_connection_wait_time,
    ),
    sc.DB_CLIENT_CONNECTION_USE_TIME: (
        db_metrics.DB_CLIENT_CONNECTION_USE_TIME,
        db_metrics.create_db_client_connection_use_time,
    ),
}

#: SDK instrument class -> the kind as the conventions spell it (an asynchronous
#: UpDownCounter is the same kind as a synchronous one).
KINDS: dict[type, str] = {
    sdk_metrics.instrument._Counter: "counter",
    sdk_metrics.instrument._UpDownCounter: "updowncounter",
    sdk_metrics.instrument._ObservableUpDownCounter: "updowncounter",
    sdk_metrics.instrument._ObservableCounter: "counter",
    sdk_metrics.instrument._Histogram: "histogram",
}


@pytest.fixture
def meter_provider() -> Iterator[Any]:
    provider = MeterProvider()
    yield provider
    provider.shutdown()


def test_convention_metric_names_are_the_semantic_conventions_names() -> None:
    for ours, (theirs, _) in CONVENTION_METRICS.items():
        assert ours == theirs


def test_convention_metrics_have_the_conventions_kind_unit_and_description(
    meter_provider: Any,
) -> None:
    meter = meter_provider.get_meter("semconv-reference")
    specs = {spec.name: spec for spec in SPECS}
    for name, (_, create) in CONVENTION_METRICS.items():
        reference = create(meter)
        spec = specs[name]
        assert (spec.name, spec.unit, spec.description) == (
            reference.name,
            reference.unit,
            reference.description,
        )
        assert spec.kind == KINDS[type(reference)], name


def test_the_instruments_asyncpool_creates_match_their_specs(meter_provider: Any) -> None:
    instruments = PoolInstruments(meter_provider.get_meter("asyncpool-under-test"))
    created = [
        instruments.wait_time,
        instruments.use_time,
        instruments.create_time,
        instruments.timeouts,
        instruments.pre_ping_failures,
        instruments.invalidations,
        instruments.connection_errors,
        instruments.rejected,
        *instruments.observables,
    ]
    made = {i.name: (KINDS[type(i)], i.unit, i.description) for i in created}
    assert made == {spec.name: (spec.kind, spec.unit, spec.description) for spec in SPECS}


def test_attribute_names_and_values_are_the_semantic_conventions_ones() -> None:
    assert sc.DB_CLIENT_CONNECTION_POOL_NAME == incubating_db.DB_CLIENT_CONNECTION_POOL_NAME
    assert sc.DB_CLIENT_CONNECTION_STATE == incubating_db.DB_CLIENT_CONNECTION_STATE
    states = incubating_db.DbClientConnectionStateValues
    assert sc.DB_CLIENT_CONNECTION_STATE_IDLE == states.IDLE.value
    assert sc.DB_CLIENT_CONNECTION_STATE_USED == states.USED.value
    assert sc.DB_SYSTEM_NAME == db_attributes.DB_SYSTEM_NAME
    assert sc.DB_SYSTEM_NAME_POSTGRESQL == db_attributes.DbSystemNameValues.POSTGRESQL.value
    assert sc.DB_NAMESPACE == db_attributes.DB_NAMESPACE
    assert sc.SERVER_ADDRESS == server_attributes.SERVER_ADDRESS
    assert sc.SERVER_PORT == server_attributes.SERVER_PORT
    assert sc.ERROR_TYPE == error_attributes.ERROR_TYPE
    assert sc.EXCEPTION_TYPE == exception_attributes.EXCEPTION_TYPE


def test_asyncpool_names_are_prefixed_and_collide_with_no_convention_name() -> None:
    convention_metrics = {
        value for key, value in vars(db_metrics).items() if key.isupper() and isinstance(value, str)
    }
    own = [spec.name for spec in SPECS if spec.name not in CONVENTION_METRICS]
    assert own == [
        sc.ASYNCPOOL_PRE_PING_FAILURES,
        sc.ASYNCPOOL_CONNECTION_INVALIDATIONS,
        sc.ASYNCPOOL_CONNECTION_ERRORS,
        sc.ASYNCPOOL_CHECKOUT_REJECTED,
        sc.ASYNCPOOL_CONNECTION_CLEANING,
        sc.ASYNCPOOL_CONNECTION_MAINTENANCE,
    ]
    for name in [
        *own,
        sc.ASYNCPOOL_INVALIDATION_REASON,
        sc.ASYNCPOOL_MAINTENANCE_ACTION,
        sc.ASYNCPOOL_CHECKOUT_WAIT,
        sc.ASYNCPOOL_CHECKOUT_QUEUED,
        sc.CHECKOUT_SPAN_NAME,
        sc.PRE_PING_FAILED_EVENT,
    ]:
        assert name.startswith("asyncpool."), name
        assert name not in convention_metrics, name
    assert len({spec.name for spec in SPECS}) == len(SPECS)
