"""psycopg 3: what the pool needs to know about its async connections.

psycopg keeps no background reader: a connection does I/O only while a task
awaits one of its operations, under the connection's ``lock``. So its state
is public and exact without a round trip: ``pgconn.transaction_status``
(``ACTIVE`` while a statement runs, ``INTRANS``/``INERROR`` inside a block)
and ``closed``. What psycopg cannot know without reading is that the server
ended an idle connection (``pg_terminate_backend`` sends a ``FATAL`` and
closes the socket): ``state()`` asks the kernel whether the idle socket is
readable (one ``select`` with a zero timeout, about 1 us) and, only then,
lets libpq read what arrived.

Cancellation: psycopg's own ``wait()`` answers a ``CancelledError`` by
sending a CancelRequest and waiting for the statement to end *in the
cancelled task*; an anyio cancel scope re-cancels that wait, and psycopg then
closes the socket while the server still runs the statement (holding its
locks until the server notices). asyncpool's connections are of a subclass
(``connect_args["async_creator_fn"]``) whose ``wait()`` lets the
cancellation through at once and leaves the statement running, as asyncpg
does: the connection comes back ``ACTIVE`` with its lock free
(``CANCELLING``), and the pool's own bounded clean-up task stops it on the
server (``settle()``: libpq 17's non-blocking CancelRequest through
``cancel_safe()``, or with an older libpq ``pg_cancel_backend()`` on a
short-lived connection, never the blocking ``PQcancel()``; then it reads the
statement's end).
An engine made with ``async_creator=`` keeps psycopg's own behaviour.

Event loops: a psycopg connection holds no loop. The pool records the loop a
connection was opened on (``connected()``) so that a dead loop's connections
are told apart as they are with asyncpg.

``command_timeout`` is the server's ``statement_timeout`` (a startup
``options`` parameter): the server cancels the statement itself, the
connection stays usable (SQLSTATE 57014) and nothing is left running.
"""

from __future__ import annotations

import asyncio
import math
import select
import weakref
from collections.abc import Mapping
from typing import Any, Final

from ..errors import ConfigurationError
from . import ConnectionState, point_at_devnull

__all__ = ["PSYCOPG", "connect_args"]

_IDLE: Final = ConnectionState.IDLE
_CLOSED: Final = ConnectionState.CLOSED

# pq.TransactionStatus values (stable libpq constants; not imported so that
# asyncpool loads without psycopg).
_TX_IDLE: Final = 0
_TX_ACTIVE: Final = 1
_TX_INTRANS: Final = 2
_TX_INERROR: Final = 3

#: libpq's ConnStatusType CONNECTION_BAD.
_BAD: Final = 1

#: How long settle() lets a cancelled statement take to end.
_SETTLE_SECONDS: Final = 5.0

#: The loop each connection was opened on.
_loops: weakref.WeakKeyDictionary[Any, asyncio.AbstractEventLoop] = weakref.WeakKeyDictionary()

#: Connections whose server said FATAL while they were idle.
_ended: weakref.WeakSet[Any] = weakref.WeakSet()


def _fatal_watch(ref: weakref.ref[Any]) -> Any:
    def on_notice(diagnostic: Any) -> None:
        severity = getattr(diagnostic, "severity_nonlocalized", None) or diagnostic.severity
        conn = ref()
        if conn is not None and severity in ("FATAL", "PANIC"):
            _ended.add(conn)

    return on_notice


#: What libpq says when a command is sent while another one runs.
BUSY_MESSAGE: Final = "another command is already in progress"

#: psycopg's messages for a connection that is gone (no SQLSTATE on them).
CLOSED_MESSAGES: Final = (
    "the connection is closed",
    "server closed the connection",
    "connection is lost",
    "consuming input failed",
    "connection not open",
    "ssl syscall error",
    "eof detected",
    "terminating connection",
    # libpq's words for a socket that failed under it, at connect or later:
    "connection reset",
    "connection refused",
    "could not receive data from server",
    "could not send data to server",
    "no connection to the server",
)


class _Psycopg:
    name = "psycopg"

    def connected(self, conn: Any) -> None:
        loop = asyncio._get_running_loop()
        if loop is not None:
            _loops[conn] = loop
        # libpq hands a FATAL read while idle to the notice handlers.
        conn.add_notice_handler(_fatal_watch(weakref.ref(conn)))

    def state(self, conn: Any) -> ConnectionState:
        pgconn = conn.pgconn
        if pgconn.status == _BAD:
            return _CLOSED
        status = pgconn.transaction_status
        if conn.lock.locked():
            return ConnectionState.BUSY  # a task is in one of its operations
        if status == _TX_ACTIVE:
            return ConnectionState.CANCELLING  # its task was cancelled mid-statement
        if _readable(pgconn.socket):
            # Nothing is expected on an idle socket: read what came (a
            # FATAL before the close, a notice, a notification).
            try:
                pgconn.consume_input()
                pgconn.is_busy()  # parses it: a FATAL goes to the notice handlers
            except Exception:
                return ConnectionState.BROKEN
            if pgconn.status == _BAD:
                return _CLOSED
            if _at_eof(pgconn.socket):
                return ConnectionState.BROKEN
        if conn in _ended:
            return ConnectionState.BROKEN
        if status == _TX_IDLE:
            return _IDLE
        if status in (_TX_INTRANS, _TX_INERROR):
            return ConnectionState.IN_TRANSACTION
        return ConnectionState.BROKEN  # UNKNOWN

    def unsettled(self, conn: Any) -> bool:
        return self.state(conn) is not _IDLE

    def loop_of(self, conn: Any) -> asyncio.AbstractEventLoop | None:
        return _loops.get(conn)

    def server_version(self, conn: Any) -> int:
        return int(conn.info.server_version)

    def abort(self, conn: Any) -> None:
        # PQfinish writes the Terminate message (non-blocking) and closes the
        # socket. Unregister the descriptor first from the running loop, in
        # case a task waits on it (it wakes at psycopg's interval and finds
        # the connection closed); a reused descriptor then starts clean.
        pgconn = conn.pgconn
        if pgconn.status != _BAD:
            loop = asyncio._get_running_loop()
            if loop is not None:
                _forget_fd(loop, pgconn.socket)
        conn._closed = True
        pgconn.finish()

    def abandon(self, conn: Any) -> None:
        """The closed loop has nothing registered any more: finish the
        connection directly (Terminate, close), no loop involved."""
        conn._closed = True
        conn.pgconn.finish()

    def drop_without_io(self, conn: Any) -> None:
        """libpq's Terminate and close then reach nobody."""
        pgconn = conn.pgconn
        if pgconn.status == _BAD:
            return
        fd = pgconn.socket
        if fd < 0:
            return
        point_at_devnull(fd)
        conn._closed = True
        pgconn.finish()

    async def ping(self, conn: Any, seconds: float) -> None:
        if conn.closed:
            raise ConnectionError("connection is closed")
        if conn.lock.locked():
            raise ConnectionError("connection is in use")
        # Simple query protocol, outside any transaction (no BEGIN first);
        # bounded without psycopg's own cancel-and-wait: a ping cut short
        # leaves the connection to be replaced.
        async with asyncio.timeout(seconds):
            await _simple(conn, b"SELECT 1")

    async def settle(self, conn: Any) -> bool:
        if conn.closed:
            raise ConnectionError("connection is closed")
        busy = conn.pgconn.transaction_status == _TX_ACTIVE
        in_use = conn.lock.locked()
        if busy and not in_use:
            # A statement cut off while being sent: send the rest first, as
            # the server ignores a cancel while it is still reading one.
            async with asyncio.timeout(_SETTLE_SECONDS), conn.lock:
                await _flush(conn)
        if busy:
            # The server answers the cancel by ending the statement; the
            # connection is settled once its result has been read.
            await _cancel(conn)
        async with asyncio.timeout(_SETTLE_SECONDS):
            if in_use:
                # Its owner reads the result (QueryCanceled) and lets go.
                async with conn.lock:
                    pass
            elif conn.pgconn.transaction_status == _TX_ACTIVE:
                await _drain(conn)
        return not in_use

    async def rollback(self, conn: Any) -> None:
        if conn.pgconn.transaction_status in (_TX_INTRANS, _TX_INERROR):
            async with conn.lock:
                await _run(conn, b"ROLLBACK")

    async def close(self, conn: Any) -> None:
        await conn.close()

    async def set_session(self, conn: Any, settings: dict[str, str]) -> None:
        await _simple(
            conn, "; ".join(f"SET {name} = {_quote(value)}" for name, value in settings.items())
        )

    def refused_as_busy(self, error: BaseException) -> bool:
        # psycopg serialises operations on its connection lock, so two tasks
        # wait for each other; libpq refuses only a command sent while an
        # abandoned one still runs.
        return BUSY_MESSAGE in str(error)

    async def wait_not_busy(self, conn: Any, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        delay = 0.001
        while self.state(conn) is ConnectionState.BUSY and loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def keep_transaction(self, adapted: Any) -> object | None:
        # psycopg tracks the transaction from the server's own status:
        # nothing to restore.
        return None

    def drop_kept_transaction(self, adapted: Any, kept: object) -> None:
        return None  # nothing was kept

    def own_tasks(self, tasks: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
        # psycopg cancels on the calling task (or ours): no background tasks of its own.
        return []


async def _cancel(conn: Any) -> None:
    """Ask the server to stop the connection's running statement, without
    blocking the loop."""
    from psycopg import capabilities

    if capabilities.has_cancel_safe():
        # libpq 17: a non-blocking CancelRequest, bounded.
        await conn.cancel_safe(timeout=_SETTLE_SECONDS)
    else:
        await _cancel_from_another_connection(conn)


#: Cancel connections open at once per event loop (libpq < 17 only): a storm
#: of cancellations must not open a storm of connections.
_CANCELS_AT_ONCE: Final = 2
_cancel_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)

#: Only the backend this connection talks to: its pid and the client port
#: the server sees (-1 over a Unix socket). A pid alone could be another
#: backend's: behind a load balancer, a pooler (whose pid is its own), or
#: reused after ours died.
_CANCEL_OURS: Final = (
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid = %s AND client_port = %s"
)


async def _cancel_from_another_connection(conn: Any) -> None:
    """Before libpq 17 the only CancelRequest is the blocking ``PQcancel()``,
    and psycopg's C implementation runs it holding the GIL: on a black-holed
    network the whole process freezes (seen with psycopg[c] on libpq 15). So
    ``pg_cancel_backend()`` on a short-lived connection of its own, to the
    same server with the same parameters, async and bounded by the caller.
    It shows in pg_stat_activity as "<application_name> (cancel)". Whenever
    the backend cannot be told apart for sure (a NAT, a pooler), or the
    connect fails (a rotated password, the server full), it raises and the
    caller closes the connection instead."""
    pgconn = conn.pgconn
    if _at_eof(pgconn.socket):
        raise ConnectionError("the server closed the connection")
    port = _local_port(pgconn.socket)
    try:
        params = {o.keyword.decode(): o.val.decode() for o in pgconn.info if o.val is not None}
    except UnicodeDecodeError:
        raise ConnectionError("connection parameters are not UTF-8") from None
    info = conn.info
    params.update(host=info.host, port=str(info.port))
    params.pop("hostaddr", None)
    if info.hostaddr:
        params["hostaddr"] = info.hostaddr
    # One known server: no second attempt, no choice of host.
    params["target_session_attrs"] = "any"
    if "load_balance_hosts" in params:
        params["load_balance_hosts"] = "disable"
    name = params.get("application_name", "").encode()[:50].decode(errors="ignore")
    params["application_name"] = f"{name} (cancel)".lstrip()
    loop = asyncio.get_running_loop()
    slots = _cancel_slots.get(loop)
    if slots is None:
        slots = _cancel_slots[loop] = asyncio.Semaphore(_CANCELS_AT_ONCE)
    async with slots:
        # Our own connection class: a cancelled wait() here sends no
        # CancelRequest of psycopg's (the blocking one, on this libpq).
        admin = await connection_class().connect(**params, autocommit=True)
        try:
            cursor = await admin.execute(_CANCEL_OURS, [info.backend_pid, port])
            row = await cursor.fetchone()
        finally:
            await admin.close()
    if not (row and row[0]):
        raise ConnectionError("the connection's backend could not be identified to cancel it")


def _local_port(fd: int) -> int:
    """The client port the server sees for this socket; -1 over a Unix socket."""
    import socket

    sock = socket.socket(fileno=fd)
    try:
        if sock.family == socket.AF_UNIX:
            return -1
        return int(sock.getsockname()[1])
    finally:
        sock.detach()


async def _simple(conn: Any, sql: str | bytes) -> None:
    """One statement on the simple query protocol, outside any transaction."""
    if conn.lock.locked():
        raise ConnectionError("connection is in use")
    async with conn.lock:
        await _run(conn, sql)


async def _run(conn: Any, sql: str | bytes) -> None:
    from psycopg import errors, generators, pq, waiting

    pgconn = conn.pgconn
    if pgconn.status == _BAD:
        raise errors.OperationalError("the connection is closed")
    pgconn.send_query(sql.encode() if isinstance(sql, str) else sql)
    results = await waiting.wait_async(generators.execute(pgconn), pgconn.socket, interval=0.1)
    for result in results:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise errors.error_from_result(result, encoding=pgconn._encoding)


async def _flush(conn: Any) -> None:
    """Send what is left of a statement whose task was cancelled mid-send."""
    from psycopg import generators, waiting

    await waiting.wait_async(generators.send(conn.pgconn), conn.pgconn.socket, interval=0.1)


async def _drain(conn: Any) -> None:
    """Read the results nobody reads (the statement's task was cancelled)."""
    from psycopg import errors, generators, waiting

    pgconn = conn.pgconn
    async with conn.lock:
        await _flush(conn)
        while pgconn.transaction_status == _TX_ACTIVE:
            try:
                await waiting.wait_async(generators.fetch_many(pgconn), pgconn.socket, interval=0.1)
            except errors.Error:
                if pgconn.status == _BAD:
                    raise


def _readable(fd: int) -> bool:
    try:
        return bool(select.select((fd,), (), (), 0)[0])
    except (OSError, ValueError):
        return True


def _at_eof(fd: int) -> bool:
    """The peer closed the socket (readable with nothing to read)."""
    import socket

    sock = socket.socket(fileno=fd)
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    finally:
        sock.detach()


def _forget_fd(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    try:
        loop.remove_reader(fd)
        loop.remove_writer(fd)
    except (OSError, ValueError, RuntimeError):
        pass


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _options_value(value: str) -> str:
    """A value for ``-c name=value`` in libpq's ``options`` (spaces escaped)."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


_connection_class: Any = None


def connection_class() -> Any:
    """``psycopg.AsyncConnection`` whose operations, when cancelled, leave the
    statement to the pool (see the module's docstring)."""
    global _connection_class
    if _connection_class is None:
        import psycopg
        from psycopg import capabilities, waiting

        class PooledConnection(psycopg.AsyncConnection[Any]):
            """psycopg's connection; a cancelled operation is settled by the pool.

            A commit or rollback while another task's operation holds the
            connection is refused at once (as asyncpg does) instead of
            queueing behind it: a give-back never waits for someone's
            statement, and the pool cancels it instead.
            """

            async def cancel_safe(self, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109
                """psycopg's, but never the blocking ``PQcancel()`` (libpq < 17),
                also where psycopg calls it itself (a stream or COPY cut short)."""
                if capabilities.has_cancel_safe() or self.closed:
                    await super().cancel_safe(timeout=timeout)
                    return
                try:
                    async with asyncio.timeout(timeout):
                        await _cancel_from_another_connection(self)
                except (ConnectionError, TimeoutError, psycopg.Error) as exc:
                    raise psycopg.errors.CancellationTimeout(str(exc)) from None

            async def commit(self) -> None:
                self._refuse_if_busy()
                await super().commit()

            async def rollback(self) -> None:
                self._refuse_if_busy()
                await super().rollback()

            def _refuse_if_busy(self) -> None:
                if self.lock.locked():
                    raise psycopg.OperationalError(BUSY_MESSAGE)

            async def wait(  # psycopg's signature
                self,
                gen: Any,
                interval: float = 0.1,
                timeout: Any = None,  # noqa: ASYNC109
            ) -> Any:
                extra = {} if timeout is None else {"timeout": timeout}
                return await waiting.wait_async(gen, self.pgconn.socket, interval=interval, **extra)

        _connection_class = PooledConnection
    return _connection_class


def connect_args(
    given: Mapping[str, Any],
    *,
    application_name: str,
    connect_timeout: float,
    command_timeout: float | None,
    server_settings: Mapping[str, str],
    pgbouncer: bool,
    name: str,
) -> dict[str, Any]:
    """``psycopg.AsyncConnection.connect()`` keyword arguments (libpq's names).

    ``connect_timeout`` is whole seconds for libpq (at least 2 in psycopg):
    rounded up. ``command_timeout`` becomes ``statement_timeout`` in the
    startup ``options``; other ``server_settings`` join it there.
    """
    args = dict(given)
    settings = dict(server_settings)
    settings.update(args.pop("server_settings", None) or {})
    args.setdefault("application_name", settings.pop("application_name", application_name))
    options = [args.pop("options", None), settings.pop("options", None)]
    if command_timeout is not None:
        settings.setdefault("statement_timeout", f"{math.ceil(command_timeout * 1000)}ms")
    words = [o for o in options if o]
    words += [f"-c {key}={_options_value(str(value))}" for key, value in settings.items()]
    if words and pgbouncer:
        # PgBouncer refuses the startup parameter, and a SET would reach
        # whichever server connection the next transaction gets.
        raise ConfigurationError(
            f"command_timeout / options / server_settings of pool {name!r} with "
            "pooler='pgbouncer' on psycopg",
            " ".join(words),
            "None: PgBouncer does not pass the 'options' startup parameter "
            "(set statement_timeout on the database or role instead)",
        )
    if words:
        args["options"] = " ".join(words)
    args.setdefault("connect_timeout", max(1, math.ceil(connect_timeout)))
    args.setdefault("async_creator_fn", connection_class().connect)
    if pgbouncer:
        threshold = args.get("prepare_threshold", None)
        if threshold is not None:
            raise ConfigurationError(
                f"connect_args['prepare_threshold'] of pool {name!r} with pooler='pgbouncer'",
                threshold,
                "None (behind PgBouncer in transaction mode a prepared statement is used on "
                "another server connection; leave it to pooler='pgbouncer')",
            )
        args["prepare_threshold"] = None
    return args


PSYCOPG: Final = _Psycopg()
