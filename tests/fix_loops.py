"""The event loop the suite runs on: asyncio, or uvloop with ``ASYNCPOOL_TEST_LOOP=uvloop``.

uvloop is what ``uvicorn[standard]`` runs, and its transports differ from
asyncio's (no real socket objects, no ``_call_connection_lost``), so CI runs
the loop-sensitive tests on both. ``run(coro)`` is ``asyncio.run`` or
``uvloop.run`` to match, for tests that run a job per loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

import pytest

LOOP: Final = os.environ.get("ASYNCPOOL_TEST_LOOP", "asyncio")
if LOOP not in ("asyncio", "uvloop"):
    raise RuntimeError(f"ASYNCPOOL_TEST_LOOP must be asyncio or uvloop, got {LOOP!r}")

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], loop: str = LOOP) -> T:
    """Run ``coro`` in a new event loop of the suite's kind (or of ``loop``)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """pytest-asyncio's loops for async tests: uvloop's when asked for."""
    if LOOP == "uvloop":
        import uvloop

        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()
