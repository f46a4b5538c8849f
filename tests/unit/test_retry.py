"""asyncpool.retry: bounded, jittered, and only for disconnects.

No server needed: a ``ConnectionResetError`` is what a dead socket raises and
is classified as a disconnect; a ``ValueError`` is not. The end-to-end runs
against killed backends are in tests/integration/test_faults.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

import asyncpool
from asyncpool import ConfigurationError
from asyncpool.retry import Retry

retry_module = sys.modules["asyncpool.retry"]


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff delays, recorded instead of slept."""
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    monkeypatch.setattr(retry_module.asyncio, "sleep", record)
    return delays


class Flaky:
    """Fails with ``error`` for the first ``failures`` calls, then returns 42."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionResetError(104, "Connection reset by peer")
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return 42


async def test_decorated_unit_of_work_reruns_after_disconnects(slept: list[float]) -> None:
    work = Flaky(failures=2)
    assert await asyncpool.retry(attempts=3)(work)() == 42
    assert work.calls == 3 and len(slept) == 2


async def test_bare_decorator_uses_the_defaults(slept: list[float]) -> None:
    work = Flaky(failures=2)

    @asyncpool.retry
    async def run() -> int:
        return await work()

    assert await run() == 42 and work.calls == 3
    assert run.__name__ == "run"  # functools.wraps


async def test_the_last_disconnect_is_raised_after_the_last_attempt(slept: list[float]) -> None:
    work = Flaky(failures=10)
    with pytest.raises(ConnectionResetError):
        await asyncpool.retry(attempts=4)(work)()
    assert work.calls == 4 and len(slept) == 3


async def test_a_non_disconnect_error_is_never_retried(slept: list[float]) -> None:
    work = Flaky(failures=1, error=ValueError("constraint"))
    with pytest.raises(ValueError, match="constraint"):
        await asyncpool.retry(attempts=5)(work)()
    assert work.calls == 1 and slept == []


async def test_cancellation_is_never_retried(slept: list[float]) -> None:
    calls = 0

    @asyncpool.retry(attempts=5)
    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await cancelled()
    assert calls == 1


async def test_backoff_doubles_up_to_the_cap_with_half_of_it_jitter(slept: list[float]) -> None:
    with pytest.raises(ConnectionResetError):
        await asyncpool.retry(attempts=8, backoff=0.1, max_backoff=1.0)(Flaky(failures=99))()
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert len(slept) == len(ceilings)
    for delay, ceiling in zip(slept, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


def test_jitter_spreads_callers_that_failed_together() -> None:
    policy = Retry(backoff=1.0, max_backoff=1.0)
    assert len({policy.delay(1) for _ in range(20)}) > 1


async def test_attempts_as_async_context_managers(slept: list[float]) -> None:
    work = Flaky(failures=1)
    results = []
    async for attempt in asyncpool.retry(attempts=3):
        async with attempt:
            results.append((attempt.number, await work()))
    assert results == [(2, 42)] and work.calls == 2


async def test_an_attempt_not_used_as_a_context_manager_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="async with attempt"):
        async for _attempt in asyncpool.retry(attempts=3):
            pass


async def test_custom_predicate_decides_what_is_retried(slept: list[float]) -> None:
    work = Flaky(failures=1, error=ValueError("transient"))
    policy = asyncpool.retry(attempts=2, retry_on=lambda exc: isinstance(exc, ValueError))
    assert await policy(work)() == 42


async def test_each_retry_logs_why(slept: list[float], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="asyncpool.retry"):
        await asyncpool.retry(attempts=2)(Flaky(failures=1))()
    (record,) = caplog.records
    assert "attempt 1 of 2" in record.getMessage()
    assert "connection_closed" in record.getMessage()


@pytest.mark.parametrize(
    "settings",
    [
        {"attempts": 0},
        {"attempts": 101},
        {"attempts": True},
        {"attempts": 2.0},
        {"backoff": -0.1},
        {"backoff": math.nan},
        {"max_backoff": math.inf},
        {"backoff": "1"},
        {"retry_on": "disconnects"},
    ],
)
def test_bad_settings_are_configuration_errors(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError) as raised:
        asyncpool.retry(**settings)  # type: ignore[call-overload]
    assert next(iter(settings)) in str(raised.value)


def test_only_callables_can_be_decorated() -> None:
    with pytest.raises(ConfigurationError, match="func must be a coroutine function"):
        asyncpool.retry(42)  # type: ignore[call-overload]


async def test_the_retry_log_never_shows_the_statement_parameters(
    slept: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    orig = asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
    error = sa_exc.DBAPIError.instance(
        "UPDATE users SET ssn = $1", ("123-45-6789",), orig, asyncpg.PostgresError
    )
    with caplog.at_level(logging.WARNING, logger="asyncpool.retry"):
        await asyncpool.retry(attempts=2)(Flaky(failures=1, error=error))()
    assert "123-45-6789" in str(error)  # SQLAlchemy's own message has them...
    (record,) = caplog.records
    assert "123-45-6789" not in record.getMessage()  # ...the log line does not
