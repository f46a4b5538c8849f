"""Classify database errors: which mean the connection (or the server) is gone.

SQLAlchemy wraps asyncpg's exceptions; the SQLSTATE sits on the driver
exception somewhere along ``orig`` / ``__cause__``. The labels returned here
are stable strings used in metrics and in ``invalidations_by_reason``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Final

__all__ = ["classify", "invalidates_pool", "is_disconnect", "sqlstate_of"]

_SQLSTATE_LABELS: Final = {
    "57P01": "admin_shutdown",
    "57P02": "crash_shutdown",
    "57P03": "cannot_connect_now",
    "57P05": "idle_session_timeout",
    "25P03": "idle_in_transaction_timeout",
    "25006": "read_only_transaction",
}

#: Labels that mean this connection cannot be used again.
_DISCONNECT_LABELS: Final = frozenset(
    {
        "admin_shutdown",
        "crash_shutdown",
        "cannot_connect_now",
        "idle_session_timeout",
        "idle_in_transaction_timeout",
        "connection_exception",
        "connection_closed",
        "protocol_error",
        "read_only_transaction",
    }
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(
            [
                getattr(current, "orig", None),
                getattr(current, "driver_exception", None),
                current.__cause__,
                current.__context__,
            ]
        )


def sqlstate_of(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE carried by ``exc`` or what it wraps, if any."""
    for current in _chain(exc):
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(code, str) and len(code) == 5:
            return code
    return None


def classify(exc: BaseException) -> str:
    """A short label: ``admin_shutdown``, ``connection_exception``, ``timeout``, ..."""
    code = sqlstate_of(exc)
    if code is not None:
        if code in _SQLSTATE_LABELS:
            return _SQLSTATE_LABELS[code]
        if code.startswith("08"):
            return "connection_exception"
        return f"sqlstate_{code}"
    for current in _chain(exc):
        name = type(current).__name__
        if name in {"ConnectionDoesNotExistError", "ConnectionResetError", "BrokenPipeError"}:
            return "connection_closed"
        if name == "InterfaceError" and "closed" in str(current):
            return "connection_closed"
        if name == "InternalClientError":
            # asyncpg's protocol lost its place ("cannot switch to state 11;
            # another operation (2) is in progress"), e.g. a FATAL error from a
            # killed backend read while idle: the connection cannot be reused.
            return "protocol_error"
        if isinstance(current, asyncio.CancelledError):
            return "cancelled"
        if isinstance(current, TimeoutError):
            return "timeout"
        if isinstance(current, ConnectionError | EOFError):
            return "connection_closed"
    return "error"


def is_disconnect(exc: BaseException) -> bool:
    """True when the connection that raised ``exc`` must not be reused."""
    return classify(exc) in _DISCONNECT_LABELS


def invalidates_pool(exc: BaseException) -> bool:
    """True when every pooled connection is suspect, not just this one.

    25006 (read-only transaction) on a pool meant for writes means the server
    was demoted by a failover: all its connections point at a replica now.
    """
    return sqlstate_of(exc) == "25006"
