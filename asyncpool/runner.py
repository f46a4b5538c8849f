"""asyncpool.run(): async database code from sync code, on an event loop kept per thread.

``asyncio.run()`` makes a new event loop for every call and closes it at the
end, so a pool used that way can never reuse a connection: each call finds its
connections bound to the previous, closed loop, drops them and connects again.
``run()`` keeps one ``asyncio.Runner`` per thread and process instead, so the
engine's connections stay pooled from one call to the next.

Each kept runner is closed at interpreter exit on the thread that exits: the
engines its loop owns are disposed on that loop first (Terminate sent, sockets
closed), so nothing is left on the server and nothing is printed. A runner
whose thread has ended is closed too, at exit or as soon as another thread
makes a new runner. A forked child never touches the runners it inherited
(see ``asyncpool.fork``): closing them would unregister the parent's
descriptors from the epoll instance the two processes share; it makes its own.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from .engine import pool_of
from .errors import AsyncPoolError
from .fork import registered_engines

__all__ = ["close", "run"]

logger = logging.getLogger("asyncpool.runner")

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@dataclass(slots=True)
class _Kept:
    """One thread's runner, with what it was made with."""

    runner: asyncio.Runner
    thread: threading.Thread
    factory: LoopFactory | None
    pid: int


#: Live runners of this process, by thread.
_kept: Final[dict[threading.Thread, _Kept]] = {}
_lock = threading.Lock()
#: In a forked child: the parent's runners, held so that nothing ever closes them.
_inherited: Final[list[_Kept]] = []
_exit_hook_installed = False


def run(
    coro: Coroutine[Any, Any, T],
    *,
    loop_factory: LoopFactory | None = None,
) -> T:
    """Run ``coro`` to completion from sync code and return its result.

    This is the way to call async database code from sync code: Celery
    tasks, Django or Flask views, management commands, scripts, notebooks.
    Unlike ``asyncio.run()``, the event loop is kept for the calling thread
    (and process) between calls, so engines keep their pooled connections
    instead of connecting again on every call::

        engine = asyncpool.create_pooled_engine(DATABASE_URL)

        async def count_users() -> int:
            async with engine.connect() as conn:
                return (await conn.execute(text("SELECT count(*) FROM users"))).scalar_one()

        @celery_app.task
        def report() -> int:
            return asyncpool.run(count_users())

    Each thread gets its own loop; an engine belongs to one loop, so threads
    that call ``run()`` at the same time need one engine each. A forked child
    (Celery prefork, gunicorn, ``multiprocessing``) makes its own loop and
    connections on its first call and never touches the parent's. At
    interpreter exit each kept loop disposes the engines it owns and is
    closed; ``asyncpool.runner.close()`` does the same earlier, for the
    calling thread.

    ``loop_factory`` (``uvloop.new_event_loop``, ...) makes the thread's loop
    on its first call; asking for another factory while that loop is kept is
    a ``RuntimeError``. Without it the loop comes from
    ``asyncio.new_event_loop()`` (so ``uvloop.install()`` applies too).

    Exceptions and cancellation propagate as with ``asyncio.run()``; Ctrl-C in
    the main thread cancels ``coro`` and raises ``KeyboardInterrupt``
    (``asyncio.Runner``), and the loop stays usable. The coroutine runs in a
    copy of the caller's context, as with ``asyncio.run()``.

    Raises ``RuntimeError`` when called while an event loop is running in
    this thread: in async code, ``await`` the coroutine instead.
    """
    if _running_loop() is not None:
        _discard(coro)
        raise RuntimeError(
            "asyncpool.run() cannot be called from a running event loop; "
            "in async code, `await` the coroutine instead"
        )
    kept = _kept_runner(loop_factory, coro)
    return kept.runner.run(coro, context=contextvars.copy_context())


def close() -> None:
    """Close the calling thread's kept loop, if any, disposing the engines it owns.

    The next ``run()`` in this thread makes a new loop (with a new
    ``loop_factory`` if one is given). Not needed before exit: kept loops
    are closed at interpreter exit.
    """
    if _running_loop() is not None:
        raise RuntimeError("asyncpool.runner.close() cannot be called from a running event loop")
    with _lock:
        kept = _kept.pop(threading.current_thread(), None)
    if kept is None:
        return
    if kept.pid != os.getpid():
        _inherited.append(kept)  # a parent's: never closed here
        return
    _close(kept)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _discard(coro: Coroutine[Any, Any, Any]) -> None:
    """Close a coroutine that will not run (no "never awaited" warning)."""
    if asyncio.iscoroutine(coro):
        coro.close()


def _kept_runner(factory: LoopFactory | None, coro: Coroutine[Any, Any, Any]) -> _Kept:
    thread = threading.current_thread()
    pid = os.getpid()
    dead: list[_Kept] = []
    with _lock:
        kept = _kept.get(thread)
        if kept is not None and kept.pid != pid:
            # Forked without the at-fork hook having run: leave it alone.
            _inherited.append(kept)
            kept = None
        if kept is not None:
            if factory is not None and factory is not kept.factory:
                _discard(coro)
                raise RuntimeError(
                    f"asyncpool.run(): this thread's event loop was made by "
                    f"{_name(kept.factory)}, not {_name(factory)}; one loop is kept per "
                    "thread: call asyncpool.runner.close() first to make a new one"
                )
            return kept
        kept = _Kept(
            asyncio.Runner(loop_factory=factory or asyncio.new_event_loop), thread, factory, pid
        )
        _kept[thread] = kept
        for other in list(_kept.values()):
            if not other.thread.is_alive() and other.thread is not thread:
                dead.append(_kept.pop(other.thread))
        _install_exit_hook()
    for other in dead:  # threads that ended without closing theirs
        try:
            _close(other)
        except Exception:
            logger.warning("could not close the event loop of %r", other.thread, exc_info=True)
    return kept


def _name(factory: LoopFactory | None) -> str:
    if factory is None:
        return "asyncio.new_event_loop"
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", repr(factory))
    return f"{module}.{qualname}" if module else qualname


def _close(kept: _Kept) -> None:
    """Dispose the engines the runner's loop owns, on that loop, then close it."""
    runner = kept.runner
    try:
        loop = runner.get_loop()
    except RuntimeError:  # closed already
        return
    if loop.is_running():  # a daemon thread still in run() at exit
        return
    try:
        runner.run(_dispose_owned(loop))
    finally:
        runner.close()


async def _dispose_owned(loop: asyncio.AbstractEventLoop) -> None:
    for engine in registered_engines():
        try:
            owner = pool_of(engine).owner_loop
        except AsyncPoolError:
            continue
        if owner is loop:
            try:
                await engine.dispose()
            except Exception:
                logger.warning("could not dispose %r on exit", engine, exc_info=True)


def _close_all_at_exit() -> None:
    with _lock:
        mine = [k for k in _kept.values() if k.pid == os.getpid()]
        _inherited.extend(k for k in _kept.values() if k.pid != os.getpid())
        _kept.clear()
    for kept in mine:
        try:
            _close(kept)
        except Exception:
            logger.warning("could not close the event loop of %r", kept.thread, exc_info=True)


def _install_exit_hook() -> None:
    global _exit_hook_installed
    if not _exit_hook_installed:
        atexit.register(_close_all_at_exit)
        _exit_hook_installed = True


def _forget_parent_runners() -> None:
    """In a forked child: drop the parent's runners without closing them (no I/O)."""
    global _lock
    _lock = threading.Lock()  # another thread may have held it at fork
    _inherited.extend(_kept.values())
    _kept.clear()


os.register_at_fork(after_in_child=_forget_parent_runners)
