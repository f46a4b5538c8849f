"""The exceptions asyncpool raises.

Each class extends what callers already catch: a pool timeout is still a
``sqlalchemy.exc.TimeoutError`` and a bad setting is still a ``ValueError``.
Messages carry the pool name and the numbers, never a password.
"""

from __future__ import annotations

import sqlalchemy.exc

__all__ = [
    "AsyncPoolError",
    "BudgetExceededError",
    "ConcurrentUseError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "PoolClosedError",
    "PoolOverloadedError",
    "PoolTimeoutError",
    "WrongEventLoopError",
]


class AsyncPoolError(Exception):
    """Base class of every exception raised by asyncpool itself."""


class ConfigurationError(AsyncPoolError, ValueError):
    """A setting is invalid.

    Raised at construction (``PoolConfig``, ``PoolConfig.from_env``,
    ``create_pooled_engine``), before any connection is opened. The message
    names the setting, the value given and the valid range.
    """

    def __init__(self, setting: str, value: object, expected: str) -> None:
        self.setting = setting
        self.value = value
        self.expected = expected
        super().__init__(f"{setting} must be {expected}, got {value!r}")


class PoolTimeoutError(AsyncPoolError, sqlalchemy.exc.TimeoutError):
    """No connection became available within ``pool_timeout`` seconds.

    Still a ``sqlalchemy.exc.TimeoutError``, so existing handlers keep working.
    """

    def __init__(
        self,
        message: str,
        *,
        pool_name: str,
        pool_size: int,
        max_overflow: int,
        checked_out: int,
        waiting: int,
        waited: float,
    ) -> None:
        self.pool_name = pool_name
        self.pool_size = pool_size
        self.max_overflow = max_overflow
        self.checked_out = checked_out
        self.waiting = waiting
        self.waited = waited
        super().__init__(message)


class PoolOverloadedError(PoolTimeoutError):
    """Refused at once: ``max_waiting`` callers were already waiting.

    Load shedding: failing fast beats queueing for ``pool_timeout`` when the
    queue is already as long as the service can afford.
    """


class WrongEventLoopError(AsyncPoolError, RuntimeError):
    """The pool was used from an event loop other than the one that owns it.

    A pool belongs to the loop that first used it. Using it from a second loop
    while the first still exists would hang or corrupt a connection; dispose
    the engine in its own loop first, or create one engine per loop.
    """


class PoolClosedError(AsyncPoolError, sqlalchemy.exc.InvalidRequestError):
    """A checkout was attempted on a pool that is shutting down or closed; or a
    shutdown ended a connection its holder still used (the message says so)."""


class ConcurrentUseError(AsyncPoolError, sqlalchemy.exc.InvalidRequestError):
    """One session or connection was used by a second task while another
    task's operation on it was still in flight (``asyncio.gather`` over one
    ``AsyncSession``, say).

    Raised in the second task, after the first task's operation has finished,
    so that the first task keeps a usable connection. The message names both
    tasks and where the connection's holder is. The fix is one session per
    task; ``task`` and ``other_task`` hold the two names.
    """

    def __init__(self, message: str, *, task: str, other_task: str | None) -> None:
        self.task = task
        self.other_task = other_task
        super().__init__(message)


class DatabaseUnavailableError(AsyncPoolError, ConnectionError):
    """The database could not be reached when the pool was warmed at start-up.

    The message names host, port and database and the driver's reason, never
    the password.
    """


class BudgetExceededError(AsyncPoolError):
    """The fleet's pools could open more connections than the server allows.

    Raised at start-up by ``pool_lifespan(..., budget="enforce")`` (and
    ``check_budget``): processes x engines x (pool_size + max_overflow) is more
    than ``max_connections`` leaves. The message shows the arithmetic and a
    per-engine size that fits; ``budget`` holds the numbers.
    """

    def __init__(self, message: str, budget: object) -> None:
        self.budget = budget
        super().__init__(message)
