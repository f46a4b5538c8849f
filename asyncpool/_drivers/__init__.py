"""Everything that knows a driver's internals, behind one small interface.

The pool never names a driver's private attributes: it asks its ``Driver``
whether a connection is settled, how to abort it without a round trip, how
to drop it without any I/O in a forked child, how to stop its statement on
the server, and how to ping it. ``_asyncpg`` and ``_psycopg`` are the two today.
"""

from __future__ import annotations

import asyncio
import enum
import os
from typing import Any, Protocol

__all__ = ["ConnectionState", "Driver", "driver_for", "point_at_devnull"]


class ConnectionState(enum.Enum):
    """What a connection is doing, as far as its driver knows without a round trip."""

    #: Open, no statement running, outside any transaction: safe to hand out.
    IDLE = "idle"
    #: Inside a transaction block, healthy or failed (``BEGIN`` without its end).
    IN_TRANSACTION = "in_transaction"
    #: A statement is running (its result has not been read yet).
    BUSY = "busy"
    #: A statement was cancelled and the server has not acknowledged it yet.
    CANCELLING = "cancelling"
    #: The driver's protocol saw something it could not handle (an error
    #: pushed by the server while idle: a terminated backend, a restart).
    BROKEN = "broken"
    #: The socket is closed.
    CLOSED = "closed"


class Driver(Protocol):
    """The operations the pool needs from a driver; ``conn`` is the driver's connection."""

    name: str

    def connected(self, conn: Any) -> None:
        """A new connection, on the running loop (before anyone uses it)."""

    def state(self, conn: Any) -> ConnectionState:
        """Cheap, no I/O: called at every give-back."""

    def unsettled(self, conn: Any) -> bool:
        """Cheap, no I/O: True unless ``state(conn)`` is ``IDLE``."""

    def loop_of(self, conn: Any) -> asyncio.AbstractEventLoop | None:
        """The event loop the connection belongs to."""

    def server_version(self, conn: Any) -> int:
        """``server_version_num`` as PostgreSQL reports it (150004), 0 if unknown."""

    def abort(self, conn: Any) -> None:
        """Close the socket now, no round trip (the server sees the connection end)."""

    def abandon(self, conn: Any) -> None:
        """Drop a connection whose event loop is closed, without using that loop."""

    def drop_without_io(self, conn: Any) -> None:
        """In a forked child: make an inherited connection inert, no I/O at all."""

    async def ping(self, conn: Any, seconds: float) -> None:
        """One cheap round trip outside any transaction; raises if it fails."""

    async def settle(self, conn: Any) -> bool:
        """Stop what the connection is doing on the server (a CancelRequest for a
        running statement) and wait until the server has acknowledged it.
        Returns False when the statement belonged to someone still using the
        connection (so it must not be reused)."""

    async def rollback(self, conn: Any) -> None:
        """End any transaction block the server still has open (simple protocol)."""

    async def close(self, conn: Any) -> None:
        """Close gracefully: the server ends the backend at once."""

    async def set_session(self, conn: Any, settings: dict[str, str]) -> None:
        """``SET`` session settings (one round trip)."""

    def own_tasks(self, tasks: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
        """The driver's own background tasks among ``tasks`` (asyncpg's
        CancelRequest senders), which a loop shutting down should let finish."""

    def refused_as_busy(self, error: BaseException) -> bool:
        """The driver refused an operation because another one is in flight on
        the same connection (two tasks using it at once)."""

    async def wait_not_busy(self, conn: Any, seconds: float) -> None:
        """Wait, at most ``seconds``, until no statement is running."""

    def keep_transaction(self, adapted: Any) -> object | None:
        """After a refused commit or rollback (the server's transaction block
        is still open), make SQLAlchemy's adapter track that block again, so
        the task whose statement runs carries on as if nothing happened. No
        I/O. Returns what it set up, for ``drop_kept_transaction``."""

    def drop_kept_transaction(self, adapted: Any, kept: object) -> None:
        """Once the other task's operation is done: undo ``keep_transaction``
        if that operation ended the block itself (a commit racing a rollback)."""


def point_at_devnull(fd: int) -> None:
    """In a forked child: make an inherited socket's descriptor lead nowhere.

    Whatever the driver does with it later (its Terminate, the close) reaches
    nobody, and the descriptor stays open, so a later close cannot hit a
    reused number. No shutdown(): that would cut the parent's connection.
    """
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def driver_for(dialect: Any) -> Driver:
    """The driver behind a SQLAlchemy dialect: psycopg (3) or asyncpg."""
    if getattr(dialect, "driver", None) == "psycopg":
        from ._psycopg import PSYCOPG

        return PSYCOPG
    from ._asyncpg import ASYNCPG

    return ASYNCPG
