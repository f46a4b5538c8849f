"""Classify database errors: which mean the connection (or the server) is gone.

SQLAlchemy wraps asyncpg's and psycopg's exceptions; the SQLSTATE sits on
the driver exception somewhere along ``orig`` / ``__cause__`` (``sqlstate``
on both). A lost connection carries no SQLSTATE: asyncpg names it with its
class, psycopg with an ``OperationalError`` message. The labels returned here
are stable strings used in metrics and in ``invalidations_by_reason``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Final

__all__ = ["classify", "is_disconnect", "sqlstate_of"]

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
    }
)


def _links(exc: BaseException) -> Iterator[list[BaseException]]:
    """``exc``'s chain in Python's order, as runs of explicitly linked exceptions.

    A run is an exception and what it wraps on purpose (SQLAlchemy's ``orig``,
    ``driver_exception``, ``__cause__``). An implicit ``__context__`` (an error
    raised while another was being handled) starts a later run, and only
    where Python's traceback shows it: no ``__cause__`` and no
    ``__suppress_context__`` (``raise ... from None``). So a disconnect
    raised while handling a constraint violation is a disconnect.
    """
    seen: set[int] = set()
    handled: list[BaseException] = [exc]
    while handled:
        run: list[BaseException] = []
        todo: list[BaseException] = [handled.pop(0)]
        while todo:
            current = todo.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            run.append(current)
            wrapped = [
                getattr(current, "orig", None),
                getattr(current, "driver_exception", None),
                current.__cause__,
            ]
            todo.extend(w for w in reversed(wrapped) if isinstance(w, BaseException))
            context = current.__context__
            shown = current.__cause__ is None and not current.__suppress_context__
            if context is not None and shown:
                handled.append(context)
        if run:
            yield run


def _chain(exc: BaseException) -> Iterator[BaseException]:
    for run in _links(exc):
        yield from run


def sqlstate_of(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE carried by ``exc`` or what it wraps, if any."""
    for current in _chain(exc):
        code = _own_sqlstate(current)
        if code is not None:
            return code
    return None


def _own_sqlstate(current: BaseException) -> str | None:
    code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
    return code if isinstance(code, str) and len(code) == 5 else None


def classify(exc: BaseException) -> str:
    """A short label: ``admin_shutdown``, ``connection_exception``, ``timeout``, ...

    The first run of the chain that says anything decides (see ``_links``).
    """
    for run in _links(exc):
        label = _label(run)
        if label is not None:
            return label
    return "error"


def _label(run: list[BaseException]) -> str | None:
    code = next((c for c in map(_own_sqlstate, run) if c is not None), None)
    if code is not None:
        if code in _SQLSTATE_LABELS:
            return _SQLSTATE_LABELS[code]
        if code == "57014" and any("statement timeout" in str(c) for c in run):
            return "statement_timeout"  # command_timeout on psycopg (the server's)
        if code.startswith("08"):
            return "connection_exception"
        return f"sqlstate_{code}"
    for current in run:
        name = type(current).__name__
        if name in {"ConnectionDoesNotExistError", "ConnectionResetError", "BrokenPipeError"}:
            return "connection_closed"
        if name == "InterfaceError" and "closed" in str(current):
            return "connection_closed"
        if name == "OperationalError" and _psycopg_lost(current):
            return "connection_closed"
        if name in {"ConnectionTimeout", "CancellationTimeout"}:
            return "timeout"  # psycopg's, not TimeoutError subclasses
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
    return None


def _psycopg_lost(exc: BaseException) -> bool:
    from ._drivers._psycopg import CLOSED_MESSAGES

    text = str(exc).lower()
    return any(message in text for message in CLOSED_MESSAGES)


def is_disconnect(exc: BaseException) -> bool:
    """True when the connection that raised ``exc`` must not be reused.

    25006 (read-only transaction) only when the pool's error handling found
    the server itself read-only (a demoted primary) and SQLAlchemy
    invalidated the connection for it; a write inside the application's own
    ``READ ONLY`` transaction is not a disconnect, and is never retried.
    """
    label = classify(exc)
    if label == "read_only_transaction":
        return any(getattr(link, "connection_invalidated", False) is True for link in _chain(exc))
    return label in _DISCONNECT_LABELS
