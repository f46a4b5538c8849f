"""Error classification: which errors mean the connection (or the server) is gone.

The errors are the driver's own, wrapped exactly as SQLAlchemy's asyncpg
dialect wraps them (translated, then ``DBAPIError.instance``), so the chain
the classifier walks is the real one.
"""

from __future__ import annotations

import asyncio

import asyncpg
import asyncpg.exceptions as pg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import (
    AsyncAdapt_asyncpg_connection,
    AsyncAdapt_asyncpg_dbapi,
)

from asyncpool._classify import classify, is_disconnect, sqlstate_of
from asyncpool._pool import PrePingFailed, invalidation_reason

DBAPI = AsyncAdapt_asyncpg_dbapi(asyncpg)


class _OpenConnection:
    """What SQLAlchemy 2.0's translation reads from the adapted connection."""

    dbapi = DBAPI
    _transaction = None
    _started = False

    class _connection:  # the attribute name SQLAlchemy reads
        @staticmethod
        def is_closed() -> bool:
            return False


def _translate(error: Exception) -> None:
    """SQLAlchemy's own translation of a driver error, on 2.1 and on 2.0."""
    no_connection = getattr(AsyncAdapt_asyncpg_connection, "_handle_exception_no_connection", None)
    if no_connection is not None:  # SQLAlchemy 2.1
        no_connection(DBAPI, error)
    else:  # SQLAlchemy 2.0 translates through the connection that raised it
        AsyncAdapt_asyncpg_connection._handle_exception(_OpenConnection(), error)


def as_sqlalchemy_raises(error: Exception) -> BaseException:
    """``error`` as application code catches it from SQLAlchemy."""
    try:
        _translate(error)
    except Exception as translated:
        return sa_exc.DBAPIError.instance("SELECT 1", {}, translated, DBAPI.Error)
    raise AssertionError("not translated")  # pragma: no cover


DISCONNECTS = [
    (pg.AdminShutdownError("terminating connection"), "57P01", "admin_shutdown"),
    (pg.CrashShutdownError("terminating connection"), "57P02", "crash_shutdown"),
    (pg.CannotConnectNowError("the system is starting up"), "57P03", "cannot_connect_now"),
    (pg.IdleSessionTimeoutError("idle-session timeout"), "57P05", "idle_session_timeout"),
    (
        pg.IdleInTransactionSessionTimeoutError("idle-in-transaction timeout"),
        "25P03",
        "idle_in_transaction_timeout",
    ),
    (pg.ConnectionDoesNotExistError("closed mid-operation"), "08003", "connection_exception"),
    (pg.ConnectionFailureError("connection failure"), "08006", "connection_exception"),
    (pg.ProtocolViolationError("protocol violation"), "08P01", "connection_exception"),
]

NOT_DISCONNECTS = [
    (pg.UniqueViolationError("duplicate key"), "23505", "sqlstate_23505"),
    (pg.DivisionByZeroError("division by zero"), "22012", "sqlstate_22012"),
    (pg.QueryCanceledError("statement timeout"), "57014", "statement_timeout"),
    (pg.QueryCanceledError("canceling statement due to user request"), "57014", "sqlstate_57014"),
    (pg.TooManyConnectionsError("too many clients"), "53300", "sqlstate_53300"),
]


@pytest.mark.parametrize(("error", "sqlstate", "label"), DISCONNECTS)
def test_server_going_away_is_a_disconnect_however_it_is_wrapped(
    error: Exception, sqlstate: str, label: str
) -> None:
    for seen in (error, as_sqlalchemy_raises(error)):
        assert sqlstate_of(seen) == sqlstate
        assert classify(seen) == label
        assert is_disconnect(seen)


@pytest.mark.parametrize(("error", "sqlstate", "label"), NOT_DISCONNECTS)
def test_ordinary_sql_errors_are_not_disconnects(
    error: Exception, sqlstate: str, label: str
) -> None:
    for seen in (error, as_sqlalchemy_raises(error)):
        assert (sqlstate_of(seen), classify(seen)) == (sqlstate, label)
        assert not is_disconnect(seen)


def test_read_only_transaction_is_a_disconnect_only_once_the_server_was_found_read_only() -> None:
    error = pg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction")
    raised = as_sqlalchemy_raises(error)
    assert isinstance(raised, sa_exc.DBAPIError)
    assert (sqlstate_of(raised), classify(raised)) == ("25006", "read_only_transaction")
    # The application's own READ ONLY transaction: its error, never retried.
    assert not is_disconnect(error) and not is_disconnect(raised)
    # The pool's handle_error listener found the server read-only (a demoted
    # primary), so SQLAlchemy invalidated the connection.
    raised.connection_invalidated = True
    assert is_disconnect(raised)


@pytest.mark.parametrize(
    ("error", "label", "disconnect"),
    [
        (pg.InterfaceError("connection is closed"), "connection_closed", True),
        (pg.InterfaceError("another operation is in progress"), "error", False),
        (pg.InternalClientError("cannot switch to state 11"), "protocol_error", True),
        (ConnectionResetError(104, "Connection reset by peer"), "connection_closed", True),
        (BrokenPipeError(32, "Broken pipe"), "connection_closed", True),
        (ConnectionRefusedError(111, "Connection refused"), "connection_closed", True),
        (EOFError(), "connection_closed", True),
        (TimeoutError(), "timeout", False),
        (ValueError("bad value"), "error", False),
    ],
)
def test_driver_and_socket_errors_without_a_sqlstate(
    error: Exception, label: str, disconnect: bool
) -> None:
    assert sqlstate_of(error) is None
    assert classify(error) == label and is_disconnect(error) is disconnect


def test_a_pool_timeout_is_not_a_disconnect() -> None:
    # sqlalchemy.exc.TimeoutError is not the builtin TimeoutError: a pool
    # that is merely busy must not look like a dead server to retry().
    from asyncpool import PoolTimeoutError

    error = PoolTimeoutError(
        "busy",
        pool_name="p",
        pool_size=1,
        max_overflow=0,
        checked_out=1,
        waiting=0,
        waited=1.0,
    )
    assert classify(error) == "error" and not is_disconnect(error)


def test_the_cause_chain_is_followed_and_cycles_do_not_hang() -> None:
    inner = pg.AdminShutdownError("terminating connection")
    outer = RuntimeError("while committing")
    outer.__cause__ = inner
    inner.__context__ = outer  # a cycle
    assert classify(outer) == "admin_shutdown"


def test_a_disconnect_while_handling_a_constraint_violation_is_a_disconnect() -> None:
    # "Insert, else update": the update's disconnect carries the insert's
    # 23505 as its context, which SQLAlchemy's ``raise ... from`` suppresses.
    duplicate = as_sqlalchemy_raises(pg.UniqueViolationError("duplicate key"))
    try:
        try:
            raise duplicate
        except sa_exc.DBAPIError:
            closed = as_sqlalchemy_raises(pg.ConnectionDoesNotExistError("closed mid-operation"))
            assert isinstance(closed, sa_exc.DBAPIError)
            raise closed from closed.orig
    except sa_exc.DBAPIError as raised:
        assert raised.__context__ is duplicate
        assert classify(raised) == "connection_exception" and is_disconnect(raised)
        assert sqlstate_of(raised) == "08003"


def test_an_error_raised_from_none_in_a_disconnect_handler_is_not_a_disconnect() -> None:
    disconnect = as_sqlalchemy_raises(pg.AdminShutdownError("terminating connection"))
    for suppress in (True, False):
        try:
            try:
                raise disconnect
            except sa_exc.DBAPIError:
                if suppress:
                    raise LookupError("no such order") from None
                # Without ``from``: Python shows the disconnect as its context.
                raise LookupError("no such order")  # noqa: B904
        except LookupError as raised:
            error: LookupError = raised
        # Python's traceback shows the disconnect only without ``from None``.
        assert is_disconnect(error) is not suppress
        assert classify(error) == ("error" if suppress else "admin_shutdown")


def test_cancellation_is_labelled_not_a_disconnect() -> None:
    assert classify(asyncio.CancelledError()) == "cancelled"
    assert not is_disconnect(asyncio.CancelledError())


def test_invalidation_reasons_name_the_pool_s_own_causes() -> None:
    assert invalidation_reason(None) == "explicit"
    ping = PrePingFailed("pre-ping failed")
    ping.__cause__ = ConnectionResetError()
    assert invalidation_reason(ping) == "pre_ping"
    assert invalidation_reason(asyncio.CancelledError()) == "cancelled"
    assert invalidation_reason(as_sqlalchemy_raises(DISCONNECTS[0][0])) == "admin_shutdown"
