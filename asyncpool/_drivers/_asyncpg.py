"""asyncpg: what the pool needs to know about its connections.

asyncpg keeps a connection's protocol state in its Cython ``Protocol``
object, mostly in C-level fields. Two things are public: the transaction
status of the last ReadyForQuery (``is_in_transaction()``) and whether a
cancellation is under way (``_is_cancelling()``). Whether a statement is
running, or whether the protocol choked on a message the server pushed while
idle (a ``FATAL`` from ``pg_terminate_backend`` arrives before the socket
closes), lives in fields Python cannot name. The garbage collector can list
them: ``gc.get_referents()`` visits every object field, and an idle,
healthy protocol holds no future (a waiter), no timer (a statement timeout)
and no exception (an unread error). It costs about 0.3 us. Should a future
asyncpg hold such objects while idle, the only effect is an extra pre-ping
or clean-up, never a dirty connection handed out.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from typing import Any, Final

from . import ConnectionState, point_at_devnull

__all__ = ["ASYNCPG"]

#: Types of the objects an idle, healthy protocol holds, learnt as they are met.
_SETTLED_TYPES: Final[set[type]] = {type(None)}


def _unsettled(fields: list[Any]) -> ConnectionState | None:
    """A protocol field that only a running statement (a waiter future, a
    statement timer) or an unread error (an exception) puts there."""
    for field in fields:
        kind = type(field)
        if kind in _SETTLED_TYPES:
            continue
        if issubclass(kind, BaseException):
            return ConnectionState.BROKEN
        if issubclass(kind, asyncio.Future | asyncio.TimerHandle):
            return ConnectionState.BUSY
        _SETTLED_TYPES.add(kind)
    return None


_IDLE: Final = ConnectionState.IDLE
_CLOSED: Final = ConnectionState.CLOSED


class _Asyncpg:
    name = "asyncpg"

    def connected(self, conn: Any) -> None:
        return None  # asyncpg keeps its loop (conn._loop)

    def state(self, conn: Any) -> ConnectionState:
        protocol = conn._protocol
        if protocol is None or conn._aborted or not protocol.is_connected():
            return _CLOSED
        if protocol._is_cancelling():
            return ConnectionState.CANCELLING
        fields = gc.get_referents(protocol)
        if not _SETTLED_TYPES.issuperset(map(type, fields)):  # all in C: ~0.4 us
            unsettled = _unsettled(fields)
            if unsettled is not None:
                return unsettled
        if protocol.is_in_transaction() or conn._top_xact is not None:
            return ConnectionState.IN_TRANSACTION
        return _IDLE

    def unsettled(self, conn: Any) -> bool:
        return self.state(conn) is not _IDLE

    def loop_of(self, conn: Any) -> asyncio.AbstractEventLoop | None:
        loop: asyncio.AbstractEventLoop | None = getattr(conn, "_loop", None)
        return loop

    def server_version(self, conn: Any) -> int:
        version = conn.get_server_version()
        return int(version.major) * 10000 + int(version.minor)

    def abort(self, conn: Any) -> None:
        # terminate() writes the Terminate message, closes the socket and
        # cancels asyncpg's own CancelRequest task, all without awaiting.
        conn.terminate()

    def abandon(self, conn: Any) -> None:
        """Shut the socket down (the server ends the backend at once) and close
        the transport by hand: the closed loop cannot run its callbacks."""
        transport = getattr(conn, "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            # uvloop hands out a pseudo-socket without shutdown(): use the
            # descriptor through a real socket object that does not own it.
            try:
                fd = sock.fileno()
                if fd >= 0:
                    _shutdown_fd(fd)
            except OSError:
                pass
        try:
            conn.terminate()
        except RuntimeError:
            pass  # "Event loop is closed": expected, the abort flag is set first
        if transport is not None and hasattr(transport, "_call_connection_lost"):
            try:
                transport._call_connection_lost(None)
            except Exception:  # pragma: no cover - depends on the loop
                pass

    def drop_without_io(self, conn: Any) -> None:
        """Marked aborted, asyncpg's ``terminate()`` and ``__del__`` leave it
        alone; its transport keeps a socket that leads nowhere."""
        conn._aborted = True
        transport = getattr(conn, "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        fd = sock.fileno() if sock is not None else -1
        if fd >= 0:
            point_at_devnull(fd)

    async def ping(self, conn: Any, seconds: float) -> None:
        if conn.is_closed():
            raise ConnectionError("connection is closed")
        # Simple query protocol: no prepared statement, no transaction.
        # (asyncpg's execute() chokes on the empty query ";".)
        await conn.execute("SELECT 1", timeout=seconds)

    async def settle(self, conn: Any) -> bool:
        protocol = conn._protocol
        if protocol is None:
            raise ConnectionError("connection is closed")
        state = self.state(conn)
        ours = state is not ConnectionState.BUSY
        if state is ConnectionState.BUSY:
            # Somebody's statement still runs: stop it on the server, as
            # asyncpg does itself when a close finds one running.
            protocol._request_cancel()
        if protocol._is_cancelling():
            await protocol._wait_for_cancellation()
        return ours

    async def rollback(self, conn: Any) -> None:
        # As asyncpg's own reset: forget its transaction object, end the block.
        conn._top_xact = None
        if conn._protocol.is_in_transaction():
            await conn.execute("ROLLBACK")

    async def close(self, conn: Any) -> None:
        await conn.close()

    async def set_session(self, conn: Any, settings: dict[str, str]) -> None:
        await conn.execute(
            "; ".join(f"SET {name} = {_quote(value)}" for name, value in settings.items())
        )

    def own_tasks(self, tasks: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
        # Connection._cancel: a cancelled query's CancelRequest, sent on a
        # connection of its own; started by the loop's cancel-all at shutdown.
        return [
            task
            for task in tasks
            if getattr(task.get_coro(), "__qualname__", "") == "Connection._cancel"
            and not task.done()
        ]

    def refused_as_busy(self, error: BaseException) -> bool:
        # asyncpg checks this before any I/O: the running statement is untouched.
        return "another operation is in progress" in str(error)

    async def wait_not_busy(self, conn: Any, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.state(conn) is ConnectionState.BUSY:
            protocol = conn._protocol
            waiter = next(
                (f for f in gc.get_referents(protocol) if isinstance(f, asyncio.Future)), None
            )
            remaining = deadline - loop.time()
            if waiter is None or remaining <= 0:
                return
            # The statement's owner registered its wake-up first: it runs
            # before this one does, and may start its next step.
            await asyncio.wait({waiter}, timeout=remaining)

    def keep_transaction(self, adapted: Any) -> object | None:
        # A refused COMMIT or ROLLBACK ended nothing on the server, but asyncpg
        # marks its Transaction failed and SQLAlchemy's adapter drops it: the
        # task whose statement runs would get "cannot use
        # Connection.transaction() in a manually started transaction" next.
        # Track the open block again, as asyncpg's own start() leaves it.
        conn = adapted.driver_connection
        if getattr(adapted, "_transaction", None) is not None or conn._top_xact is not None:
            return None
        from asyncpg.transaction import TransactionState

        transaction = conn.transaction(
            isolation=getattr(adapted, "isolation_level", None),
            readonly=getattr(adapted, "readonly", False),
            deferrable=getattr(adapted, "deferrable", False),
        )
        transaction._state = TransactionState.STARTED
        conn._top_xact = transaction
        adapted._transaction = transaction
        if hasattr(adapted, "_started"):  # SQLAlchemy 2.0
            adapted._started = True
        kept: object = transaction
        return kept

    def drop_kept_transaction(self, adapted: Any, kept: object) -> None:
        # The in-flight operation was itself a COMMIT or ROLLBACK: the block
        # is over on the server, so the Transaction kept above is a phantom.
        conn = adapted.driver_connection
        protocol = conn._protocol
        if protocol is None or protocol.is_in_transaction():
            return
        if conn._top_xact is kept:
            conn._top_xact = None
        if getattr(adapted, "_transaction", None) is kept:
            adapted._transaction = None
            if hasattr(adapted, "_started"):  # SQLAlchemy 2.0
                adapted._started = False


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _shutdown_fd(fd: int) -> None:
    """``shutdown(SHUT_RDWR)`` on a descriptor we do not own (the transport does)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()  # leave the descriptor open: the transport closes it


ASYNCPG: Final = _Asyncpg()
