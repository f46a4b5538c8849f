"""probe_database(engine, seconds): is the database up, asked outside the pool.

A readiness probe must not queue behind the saturation it reports, so the
question goes over a connection of its own: opened with the pool's creator
(the engine's dialect, URL, ``connect_args``, TLS and ``do_connect`` hooks,
exactly as a pooled connection would be), pinged, and closed at once. It is
never checked out, so the pool's queue, slots and counters are untouched
(the pool counts connects in ``_invoke_creator``, which this bypasses).

Each probe costs one short-lived server connection beyond ``max_size``, and
there is at most one per pool at a time: callers that ask while a probe of
the same pool (and timeout) is under way share its answer, so a burst of
health requests cannot open a burst of server connections.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from ._drivers import driver_for
from ._url import scrub

__all__ = ["first_line", "probe_database"]


#: The probe under way for a pool, by timeout.
_in_flight: weakref.WeakKeyDictionary[Any, dict[float, asyncio.Task[str | None]]] = (
    weakref.WeakKeyDictionary()
)


async def probe_database(engine: AsyncEngine, seconds: float) -> str | None:
    """None when the database answers ``SELECT 1`` on a new connection within
    ``seconds``, else why not (no password in it)."""
    loop = asyncio.get_running_loop()
    tasks = _in_flight.setdefault(engine.sync_engine.pool, {})
    task = tasks.get(seconds)
    if task is None or task.done() or task.get_loop() is not loop:
        task = tasks[seconds] = loop.create_task(_probe(engine, seconds))

        def forget(done: asyncio.Task[str | None]) -> None:
            if tasks.get(seconds) is done:
                del tasks[seconds]

        task.add_done_callback(forget)
    # Shielded: a caller that goes away does not cut the answer short for the others.
    return await asyncio.shield(task)


async def _probe(engine: AsyncEngine, seconds: float) -> str | None:
    sync_engine = engine.sync_engine
    driver = driver_for(sync_engine.dialect)
    connection: Any = None
    try:
        with anyio.fail_after(seconds):
            # Called without a record, as SQLAlchemy's own creator and
            # ``async_creator`` wrapper allow.
            connection = await greenlet_spawn(sync_engine.pool._creator)
            await driver.ping(connection.driver_connection, seconds)
    except TimeoutError:
        return f"no answer within {seconds:g} s"
    except Exception as exc:
        # Outside the pool SQLAlchemy does not wrap the error: show the driver's.
        error = getattr(exc, "orig", None) or exc
        return scrub(f"{type(error).__name__}: {first_line(error)}", [engine.url])
    finally:
        if connection is not None:
            # No await: a cancelled probe cannot leave its connection open.
            driver.abort(connection.driver_connection)
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an error (of the driver's error under SQLAlchemy's)."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else ""
