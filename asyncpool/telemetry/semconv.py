"""Every name asyncpool's telemetry emits, in one place.

Metric, attribute and value names follow the OpenTelemetry semantic
conventions for database client connection pools verbatim (status
Development, ``opentelemetry.semconv._incubating.metrics.db_metrics``); where
the conventions are silent the name carries the ``asyncpool.`` prefix.
``tests/unit/test_semconv.py`` checks the convention names, units and
descriptions against the ``opentelemetry-semantic-conventions`` package, so a
rename upstream fails a test instead of silently splitting a dashboard.

The constants are plain strings on purpose: this module imports nothing, so
dashboards, tests and benchmarks can use it without the OpenTelemetry SDK.
"""

from __future__ import annotations

from typing import Final

# ------------------------------------------------------------------ metrics
# Semantic conventions: db.client.connection.* (UCUM units; durations in s).

#: UpDownCounter: connections in the state given by ``db.client.connection.state``.
DB_CLIENT_CONNECTION_COUNT: Final = "db.client.connection.count"
#: UpDownCounter: the most idle open connections the pool keeps (``pool_size``).
DB_CLIENT_CONNECTION_IDLE_MAX: Final = "db.client.connection.idle.max"
#: UpDownCounter: connections opened when the pool is warmed (``min_idle``).
DB_CLIENT_CONNECTION_IDLE_MIN: Final = "db.client.connection.idle.min"
#: UpDownCounter: the most open connections allowed (``pool_size + max_overflow``).
DB_CLIENT_CONNECTION_MAX: Final = "db.client.connection.max"
#: UpDownCounter: callers queued for a connection now.
DB_CLIENT_CONNECTION_PENDING_REQUESTS: Final = "db.client.connection.pending_requests"
#: Counter: checkouts that gave up after ``pool_timeout``.
DB_CLIENT_CONNECTION_TIMEOUTS: Final = "db.client.connection.timeouts"
#: Histogram: seconds to open a new connection.
DB_CLIENT_CONNECTION_CREATE_TIME: Final = "db.client.connection.create_time"
#: Histogram: seconds from asking for a connection to holding an open, checked one.
DB_CLIENT_CONNECTION_WAIT_TIME: Final = "db.client.connection.wait_time"
#: Histogram: seconds from checkout to checkin.
DB_CLIENT_CONNECTION_USE_TIME: Final = "db.client.connection.use_time"

# asyncpool's own (the conventions define nothing for these).

#: Counter: connections found dead by the pre-ping and replaced, unseen by the caller.
ASYNCPOOL_PRE_PING_FAILURES: Final = "asyncpool.pre_ping.failures"
#: Counter: connections discarded as unusable, by ``asyncpool.invalidation.reason``.
ASYNCPOOL_CONNECTION_INVALIDATIONS: Final = "asyncpool.connection.invalidations"
#: Counter: failed attempts to open a connection, by ``error.type``.
ASYNCPOOL_CONNECTION_ERRORS: Final = "asyncpool.connection.errors"
#: Counter: checkouts refused at once because ``max_waiting`` callers already waited.
ASYNCPOOL_CHECKOUT_REJECTED: Final = "asyncpool.checkout.rejected"
#: UpDownCounter: connections being cleaned after their caller gave up (each holds a slot).
ASYNCPOOL_CONNECTION_CLEANING: Final = "asyncpool.connection.cleaning"
#: Counter (observed): the maintenance task's work, by ``asyncpool.maintenance.action``.
ASYNCPOOL_CONNECTION_MAINTENANCE: Final = "asyncpool.connection.maintenance"

# -------------------------------------------------------------------- units

UNIT_CONNECTION: Final = "{connection}"
UNIT_REQUEST: Final = "{request}"
UNIT_TIMEOUT: Final = "{timeout}"
UNIT_FAILURE: Final = "{failure}"
UNIT_ERROR: Final = "{error}"
UNIT_SECONDS: Final = "s"

# --------------------------------------------------------------- attributes

#: The pool's name (``PoolConfig.name``); on every metric point and checkout span.
DB_CLIENT_CONNECTION_POOL_NAME: Final = "db.client.connection.pool.name"
#: ``idle`` or ``used``, on ``db.client.connection.count``.
DB_CLIENT_CONNECTION_STATE: Final = "db.client.connection.state"
DB_CLIENT_CONNECTION_STATE_IDLE: Final = "idle"
DB_CLIENT_CONNECTION_STATE_USED: Final = "used"

#: Span attributes of the stable database conventions.
DB_SYSTEM_NAME: Final = "db.system.name"
DB_SYSTEM_NAME_POSTGRESQL: Final = "postgresql"
DB_NAMESPACE: Final = "db.namespace"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
#: Fully qualified class name of the failure (``builtins.`` omitted).
ERROR_TYPE: Final = "error.type"
EXCEPTION_TYPE: Final = "exception.type"

#: Why a connection was invalidated: ``pre_ping``, ``explicit``, ``loop_closed``,
#: ``cancelled``, ``admin_shutdown``, ``connection_closed``, ... (see ``_classify``).
ASYNCPOOL_INVALIDATION_REASON: Final = "asyncpool.invalidation.reason"
#: What the maintenance did, on ``asyncpool.connection.maintenance``: ``refill``,
#: ``refill_failure``, ``idle_close``, ``recycle``, ``keepalive_failure``.
ASYNCPOOL_MAINTENANCE_ACTION: Final = "asyncpool.maintenance.action"
#: Seconds the checkout took (queueing, connecting and pre-ping), on checkout spans.
ASYNCPOOL_CHECKOUT_WAIT: Final = "asyncpool.checkout.wait"
#: True when the checkout queued behind other callers, on checkout spans.
ASYNCPOOL_CHECKOUT_QUEUED: Final = "asyncpool.checkout.queued"

# -------------------------------------------------------------------- spans

#: The span around a checkout that queued, timed out, was refused or pre-pinged a dead connection.
CHECKOUT_SPAN_NAME: Final = "asyncpool.checkout"
#: Span event: the pre-ping found the connection dead; it was replaced.
PRE_PING_FAILED_EVENT: Final = "asyncpool.pre_ping.failed"

# ------------------------------------------------------------------- scope

#: Instrumentation scope name of the meter and tracer.
INSTRUMENTATION_SCOPE: Final = "asyncpool"
