"""One session or connection used by two tasks at once: a clear error.

``asyncio.gather`` over one ``AsyncSession`` is the commonest cause of
asyncpg's "another operation is in progress", which users cannot tell from a
dirty or cross-loop connection. Two places see the collision:

* the driver refuses an operation while another task's is in flight (a
  commit racing a statement): the ``handle_error`` listener calls
  ``raise_for_refusal``. The refused commit did nothing on the server, so
  the first task's transaction carries on; SQLAlchemy's adapter is made to
  track it again (it forgets it even when the driver refused to end it).
* SQLAlchemy refuses a session that another task is connecting ("This
  session is provisioning a new connection"): ``_guard_session``, a session
  listener, sees it first. Any session listener makes SQLAlchemy build an
  ``ORMExecuteState`` per statement (about 4% of a session statement's CPU
  here), so it is installed only where ``detect_concurrent_use`` asks.

Either way the second task waits until the first one's operation is done, so
the first task keeps a usable connection and whoever closes the session next
finds it idle. Then it gets ``ConcurrentUseError``, naming both tasks and
where the connection's holder is. The task search runs only on a collision.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import SessionTransactionState
from sqlalchemy.util import await_only

from .errors import ConcurrentUseError

if TYPE_CHECKING:
    from sqlalchemy.engine import ExceptionContext
    from sqlalchemy.orm import ORMExecuteState

    from ._pool import FairAsyncPool
    from .config import PoolConfig

__all__ = ["detect_concurrent_use", "guard_sessions", "raise_for_refusal"]

_PROVISIONING: Final = SessionTransactionState.PROVISIONING_CONNECTION

#: Frames from these folders are plumbing, not where the user's code is.
_LIBRARIES: Final = tuple(
    os.path.dirname(module.__file__ or "") + os.sep
    for module in (
        asyncio,
        __import__("sqlalchemy"),
        __import__("asyncpg"),
        __import__("asyncpool"),
    )
)

_FIX: Final = (
    "a session (or connection) serves one task at a time: give each task its own, "
    "e.g. `async with Session() as s:` inside the coroutine you gather"
)


def raise_for_refusal(context: ExceptionContext, pool: FairAsyncPool) -> None:
    """The driver refused an operation because another task's is in flight:
    wait for that one to finish, keep the adapter's transaction, and raise."""
    fairy = getattr(context.connection, "_dbapi_connection", None)
    adapted = getattr(fairy, "dbapi_connection", None)
    conn = getattr(adapted, "driver_connection", None)
    if conn is None:
        return
    driver = pool.driver
    other = _task_using(lambda owner: _refers_to(owner, (conn, adapted)))
    # The refused COMMIT or ROLLBACK did nothing on the server; asyncpg got
    # there before any I/O. The first task's block stays its own.
    kept = driver.keep_transaction(adapted)
    await_only(driver.wait_not_busy(conn, pool.state.config.cleanup_timeout))
    if kept is not None:
        driver.drop_kept_transaction(adapted, kept)
    holder = getattr(fairy, "_connection_record", None)
    holder_task = getattr(holder, "_ap_holder", None) if holder is not None else None
    raise _error("connection", other, holder_task) from context.original_exception


def detect_concurrent_use(config: PoolConfig) -> bool:
    """The setting, or asyncio's debug mode as Python was started (``None``)."""
    if config.detect_concurrent_use is not None:
        return config.detect_concurrent_use
    return sys.flags.dev_mode or bool(os.environ.get("PYTHONASYNCIODEBUG"))


def guard_sessions() -> None:
    """Install the session listener, once per process (every ``Session`` then
    pays for it; it acts on sessions bound to asyncpool's pools only)."""
    if not event.contains(Session, "do_orm_execute", _guard_session):
        event.listen(Session, "do_orm_execute", _guard_session)


def _guard_session(state: ORMExecuteState) -> None:
    session = state.session
    transaction = session.get_transaction()
    if transaction is None or getattr(transaction, "_state", None) is not _PROVISIONING:
        return
    pool = _fair_pool_of(session, state)
    if pool is None or asyncio._get_running_loop() is None:
        return  # not ours, or a sync session shared between threads
    other = _task_using(lambda owner: _refers_to(owner, (session,)))
    if other is None:
        # This very task is connecting the session (a statement from an
        # after_begin listener, say): SQLAlchemy's own error says it at once.
        return
    await_only(_until_connected(session, pool))
    raise _error("session", other, other)


async def _until_connected(session: Session, pool: FairAsyncPool) -> None:
    """Wait until the other task has its connection and its statement is done."""
    config = pool.state.config
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.pool_timeout + config.connect_timeout
    delay = 0.001
    # SQLAlchemy signals nothing when a session is connected: look, backing off.
    while _provisioning(session) and loop.time() < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    transaction = session.get_transaction()
    for connection in getattr(transaction, "_connections", {}).values():
        fairy = getattr(connection[0], "_dbapi_connection", None)
        conn = getattr(getattr(fairy, "dbapi_connection", None), "driver_connection", None)
        if conn is not None:
            await pool.driver.wait_not_busy(conn, max(0.0, deadline - loop.time()))


def _provisioning(session: Session) -> bool:
    transaction = session.get_transaction()
    return transaction is not None and getattr(transaction, "_state", None) is _PROVISIONING


def _fair_pool_of(session: Session, state: ORMExecuteState) -> FairAsyncPool | None:
    from ._pool import FairAsyncPool

    try:
        bind = session.get_bind(**state.bind_arguments)
    except Exception:
        return None
    pool = getattr(getattr(bind, "engine", bind), "pool", None)
    return pool if isinstance(pool, FairAsyncPool) else None


def _error(
    what: str, other: asyncio.Task[Any] | None, holder: asyncio.Task[Any] | None
) -> ConcurrentUseError:
    me = asyncio.current_task()
    name = me.get_name() if me is not None else "?"
    where = _where(me)
    other_name = other.get_name() if other is not None else None
    first = (
        f"task {other_name!r} ({_where(other)})"
        if other is not None
        else "another task (it could not be found)"
    )
    message = (
        f"task {name!r} ({where}) used a {what} while {first} had an operation in flight on it"
    )
    if holder is not None and holder is not other:
        message += f"; the {what} was checked out by task {holder.get_name()!r} ({_where(holder)})"
    message += f". {_FIX}."
    return ConcurrentUseError(message, task=name, other_task=other_name)


def _refers_to(owner: object, targets: tuple[object, ...]) -> bool:
    """``owner`` is one of ``targets`` or holds one (a cursor, a transaction,
    an ``AsyncSession`` around a session)."""
    if owner is None:
        return False
    if any(owner is target for target in targets):
        return True
    for name in ("_adapt_connection", "_connection", "sync_session"):
        held = getattr(owner, name, None)
        if held is not None and any(held is target for target in targets):
            return True
    return False


def _task_using(is_ours: Callable[[object], bool]) -> asyncio.Task[Any] | None:
    """The task, other than this one, whose awaits pass through an object ``is_ours``."""
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is me or task.done():
            continue
        for frame in _await_chain(task):
            if is_ours(frame.f_locals.get("self")):
                return task
    return None


def _await_chain(task: asyncio.Task[Any]) -> Iterator[FrameType]:
    """The frames of a suspended task, outermost first, along ``cr_await``."""
    coro: Any = task.get_coro()
    for _ in range(64):
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            return
        yield frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


def _where(task: asyncio.Task[Any] | None) -> str:
    """Where the task's own code is: its innermost frame outside the libraries."""
    if task is None:
        return "unknown"
    frames = list(_await_chain(task))
    user = [f for f in frames if not f.f_code.co_filename.startswith(_LIBRARIES)]
    if user:
        return _at(user[-1].f_code.co_filename, user[-1].f_lineno, user[-1].f_code.co_name)
    # A coroutine handed straight to gather(): where the task was created is
    # known in asyncio's debug mode only; else name what it runs.
    created = getattr(task, "_source_traceback", None) or []
    for entry in reversed(created):
        if not entry.filename.startswith(_LIBRARIES):
            return "created at " + _at(entry.filename, entry.lineno, entry.name)
    coro = task.get_coro()
    return f"running {getattr(coro, '__qualname__', type(coro).__name__)}()"


def _at(filename: str, lineno: int | None, name: str) -> str:
    return f"{os.path.basename(filename)}:{lineno} in {name}"
