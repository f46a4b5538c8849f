"""``asyncpool advise`` only suggests what asyncpool accepts.

Its ``ASYNCPOOL_*`` line goes back through ``PoolConfig.from_env`` and its
``simulate`` line through the ``simulate`` parser, for any load hypothesis
draws within the flags' ranges; past those ranges a flag is a usage error
(exit 2) naming the flag and the range, never a traceback.
"""

from __future__ import annotations

import io
import math
import shlex
from collections.abc import Iterator
from typing import Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncpool import ConfigurationError, PoolConfig
from asyncpool.cli import build_parser, main
from asyncpool.cli._args import config_from_args
from asyncpool.cli._sizing import LIMITS, Target, advise
from asyncpool.cli.simulate import DEFAULTS, _profile

PROPERTIES = settings(
    max_examples=120,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the checkout
    suppress_health_check=[HealthCheck.too_slow],
)

ENV_PREFIX: Final = "as environment: "
TRY_PREFIX: Final = "try it:         asyncpool "


@pytest.fixture(autouse=True, scope="module")
def _clean_environment() -> Iterator[None]:
    """No ASYNCPOOL_* pool settings from the caller's shell reach ``simulate``'s parser."""
    with pytest.MonkeyPatch.context() as patch:
        import os

        for key in list(os.environ):
            if key.startswith("ASYNCPOOL_") and key != "ASYNCPOOL_TEST_DSN":
                patch.delenv(key)
        yield


def run_advise(argv: list[str]) -> str:
    stdout = io.StringIO()
    assert main(["advise", *argv], stdout=stdout) == 0
    return stdout.getvalue()


def line(out: str, prefix: str) -> str:
    (found,) = [x for x in out.splitlines() if x.startswith(prefix)]
    return found.removeprefix(prefix)


def check_suggestions(out: str) -> PoolConfig:
    """Both suggestions parse, and give the same settings."""
    pairs = [item.split("=", 1) for item in line(out, ENV_PREFIX).split()]
    from_env = PoolConfig.from_env(environ=dict(pairs))
    args = build_parser().parse_args(shlex.split(line(out, TRY_PREFIX)))
    from_flags = config_from_args(args, DEFAULTS)
    _profile(args)  # within simulate's bound on requests per run
    keys = ("pool_size", "max_overflow", "pool_timeout", "max_waiting")
    assert [getattr(from_env, k) for k in keys] == [getattr(from_flags, k) for k in keys]
    return from_env


def number(name: str) -> st.SearchStrategy[str]:
    low, high, low_excluded = LIMITS[name]
    if isinstance(low, int):
        return st.integers(int(low), int(high)).map(str)
    floats = st.floats(low, high, exclude_min=low_excluded, allow_nan=False)
    return (floats | st.sampled_from([high, 0.0001 if low_excluded else low])).map(repr)


@st.composite
def advise_argv(draw: st.DrawFn) -> list[str]:
    peak = draw(st.sampled_from(["peak_rps", "peak_concurrent"]))
    argv = ["--" + peak.replace("_", "-"), draw(number(peak)), "--hold", draw(number("hold"))]
    flags = {
        "processes": "--processes",
        "request_timeout": "--request-timeout",
        "max_connections": "--max-connections",
        "cores": "--server-cores",
        "spindles": "--spindles",
        "reserve": "--reserve",
    }
    for name, flag in flags.items():
        if draw(st.booleans()):
            argv += [flag, draw(number(name))]
    return argv


@pytest.mark.slow  # the main pass runs it; the other passes deselect it
@PROPERTIES
@given(argv=advise_argv())
def test_advice_for_any_load_is_accepted_by_pool_config_and_simulate(argv: list[str]) -> None:
    check_suggestions(run_advise(argv))


def test_a_short_deadline_gives_a_pool_timeout_above_zero() -> None:
    out = run_advise(["--peak-rps", "120", "--hold", "0.1", "--request-timeout", "0.05"])
    assert check_suggestions(out).pool_timeout == 0.025


def test_a_load_past_pool_config_limits_is_clamped_with_a_note() -> None:
    out = run_advise(["--peak-rps", "1000000", "--hold", "1"])
    config = check_suggestions(out)
    assert config.pool_size == 10_000 and config.max_waiting <= 1_000_000
    assert "pool_size = 1000000, more than PoolConfig allows (10000): clamped" in out
    assert "--spike 0.5 " in line(out, TRY_PREFIX)  # 1e6 req/s for 0.5 s fits simulate's bound


def test_a_long_queue_is_clamped_to_max_waitings_limit() -> None:
    out = run_advise(["--peak-rps", "20000", "--hold", "0.001", "--request-timeout", "86400"])
    assert check_suggestions(out).max_waiting == 1_000_000
    assert "max_waiting = " in out and "clamped to 1000000" in out


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--peak-rps", "1e300", "a number > 0 and <= 10000000"),
        ("--peak-rps", "inf", "a number > 0 and <= 10000000"),
        ("--peak-concurrent", "1e12", "a number > 0 and <= 10000000"),
        ("--hold", "1e10", "a number from 1e-05 to 3600"),
        ("--hold", "1e-300", "a number from 1e-05 to 3600"),
        ("--processes", "10000000", "an integer from 1 to 100000"),
        ("--request-timeout", "1e300", "a number from 0.001 to 86400"),
        ("--request-timeout", "5e-324", "a number from 0.001 to 86400"),
        ("--max-connections", "99999999999", "an integer from 1 to 262143"),
        ("--server-cores", "99999999999", "an integer from 1 to 100000"),
        ("--spindles", "99999999999", "an integer from 0 to 100000"),
        ("--reserve", "99999999999", "an integer from 0 to 262143"),
    ],
)
def test_a_flag_past_its_range_is_a_usage_error_naming_it(
    flag: str, value: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = {"--peak-rps": [], "--peak-concurrent": []}.get(flag, ["--peak-rps", "120"])
    argv = [*argv, "--hold", "0.1", flag, value]
    with pytest.raises(SystemExit) as exc:
        main(["advise", *argv], stdout=io.StringIO())
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected {expected}, got {value!r}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("field", ["peak_rps", "hold", "request_timeout", "processes"])
def test_the_sizing_arithmetic_refuses_a_number_outside_its_range(field: str) -> None:
    values = {"hold": 0.1, "peak_rps": 120.0, field: math.inf if field != "processes" else 0}
    with pytest.raises(ConfigurationError) as exc:
        advise(Target(**values))  # type: ignore[arg-type]
    assert exc.value.setting == field
