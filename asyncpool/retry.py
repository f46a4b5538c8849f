"""``asyncpool.retry``: re-run a whole idempotent unit of work after a disconnect.

The pre-ping cannot save a request whose connection dies mid-query (a killed
backend, a restart, a failover). SQLAlchemy's advice is to retry the whole
transaction, never a single statement, since the ones before it were rolled
back with the connection. ``retry`` does that with a bounded number of
attempts and jittered exponential backoff, and only for disconnects: any
other error (a constraint violation, a bug, a pool timeout, a cancellation)
goes to the caller on the first attempt.

As a decorator::

    @asyncpool.retry(attempts=3)
    async def transfer(amount: int) -> None:
        async with engine.begin() as conn:
            ...

As async context managers, one per attempt (Python cannot re-run the body of
a single ``async with``, so the attempts come from an ``async for``)::

    async for attempt in asyncpool.retry(attempts=3):
        async with attempt, engine.begin() as conn:
            ...

Only wrap work that is safe to run twice: a disconnect during ``COMMIT``
leaves it unknown whether the commit happened.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Final, ParamSpec, TypeVar, overload

from ._classify import classify, is_disconnect
from ._validate import check_callable, check_int, check_seconds

__all__ = ["Attempt", "Retry", "retry"]

logger = logging.getLogger("asyncpool.retry")

P = ParamSpec("P")
T = TypeVar("T")

_DEFAULT_ATTEMPTS: Final = 3
_DEFAULT_BACKOFF: Final = 0.1
_DEFAULT_MAX_BACKOFF: Final = 2.0
_MAX_ATTEMPTS: Final = 100


class Retry:
    """A retry policy: a decorator for coroutine functions, and an async iterable of attempts.

    ``attempts`` is the total number of runs (1 means no retry). Before retry
    ``n`` (1-based) it sleeps between half and all of
    ``min(max_backoff, backoff * 2 ** (n - 1))`` seconds: the jitter spreads
    the callers that a restart failed at the same moment. ``retry_on``
    decides which errors are disconnects (default: ``is_disconnect``).
    """

    __slots__ = ("attempts", "backoff", "max_backoff", "retry_on")

    def __init__(
        self,
        *,
        attempts: int = _DEFAULT_ATTEMPTS,
        backoff: float = _DEFAULT_BACKOFF,
        max_backoff: float = _DEFAULT_MAX_BACKOFF,
        retry_on: Callable[[BaseException], bool] = is_disconnect,
    ) -> None:
        check_int("attempts", attempts, low=1, high=_MAX_ATTEMPTS)
        check_seconds("backoff", backoff, allow_zero=True)
        check_seconds("max_backoff", max_backoff, allow_zero=True)
        check_callable("retry_on", retry_on, "a callable taking the exception")
        self.attempts = attempts
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.retry_on = retry_on

    def __repr__(self) -> str:
        return (
            f"Retry(attempts={self.attempts}, backoff={self.backoff:g}, "
            f"max_backoff={self.max_backoff:g})"
        )

    def delay(self, retry_number: int) -> float:
        """Seconds to sleep before retry ``retry_number`` (1-based), jittered."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** (retry_number - 1))
        return ceiling / 2 + random.uniform(0.0, ceiling / 2)

    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Decorate a coroutine function: each call is retried as a whole."""
        check_callable("func", func, "a coroutine function (asyncpool.retry decorates those)")

        @functools.wraps(func)
        async def retried(*args: P.args, **kwargs: P.kwargs) -> T:
            async for attempt in self:
                async with attempt:
                    return await func(*args, **kwargs)
            raise AssertionError("unreachable: the last attempt re-raises")  # pragma: no cover

        return retried

    def __aiter__(self) -> AsyncIterator[Attempt]:
        return _Attempts(self)


class _Attempts:
    """The attempts of one run: the next one comes only after a swallowed disconnect."""

    __slots__ = ("last", "policy")

    def __init__(self, policy: Retry) -> None:
        self.policy = policy
        self.last: Attempt | None = None

    def __aiter__(self) -> _Attempts:
        return self

    async def __anext__(self) -> Attempt:
        last = self.last
        if last is not None:
            if not last.entered:
                raise RuntimeError("use each asyncpool.retry attempt as `async with attempt:`")
            if last.error is None:
                raise StopAsyncIteration  # it succeeded (or raised through the loop)
            delay = self.policy.delay(last.number)
            # The first line only: SQLAlchemy's message goes on with the SQL
            # and its parameters, which may hold personal data.
            reason = str(last.error).partition("\n")[0]
            logger.warning(
                "attempt %d of %d failed with a disconnect (%s: %s); retrying in %.2f s",
                last.number,
                self.policy.attempts,
                classify(last.error),
                reason,
                delay,
            )
            await asyncio.sleep(delay)
        self.last = Attempt(self.policy, 1 if last is None else last.number + 1)
        return self.last


class Attempt:
    """One run of the unit of work: an async context manager that swallows a
    retryable error unless it is the last attempt."""

    __slots__ = ("entered", "error", "number", "policy")

    def __init__(self, policy: Retry, number: int) -> None:
        self.policy = policy
        #: 1 for the first run.
        self.number = number
        self.entered = False
        #: The disconnect this attempt swallowed, if any.
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<Attempt {self.number} of {self.policy.attempts}>"

    async def __aenter__(self) -> Attempt:
        self.entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False  # success, or a cancellation: never retried
        if self.number >= self.policy.attempts or not self.policy.retry_on(exc):
            return False
        self.error = exc
        return True


@overload
def retry(func: Callable[P, Awaitable[T]], /) -> Callable[P, Awaitable[T]]: ...


@overload
def retry(
    *,
    attempts: int = ...,
    backoff: float = ...,
    max_backoff: float = ...,
    retry_on: Callable[[BaseException], bool] = ...,
) -> Retry: ...


def retry(
    func: Callable[P, Awaitable[T]] | None = None,
    /,
    *,
    attempts: int = _DEFAULT_ATTEMPTS,
    backoff: float = _DEFAULT_BACKOFF,
    max_backoff: float = _DEFAULT_MAX_BACKOFF,
    retry_on: Callable[[BaseException], bool] = is_disconnect,
) -> Callable[P, Awaitable[T]] | Retry:
    """Retry a unit of work after a disconnect: ``@retry``, ``@retry(attempts=5)``,
    or ``async for attempt in retry(): async with attempt: ...``.

    Defaults: 3 attempts, backoff 0.1 s doubling up to 2 s, half of it jitter.
    """
    policy = Retry(attempts=attempts, backoff=backoff, max_backoff=max_backoff, retry_on=retry_on)
    if func is None:
        return policy
    return policy(func)
