"""The asyncpool command without a server: help, flags from PoolConfig, errors that name the flag,
profiles, sizing arithmetic and the live view's rendering."""

from __future__ import annotations

import dataclasses
import io
import json
from importlib.metadata import entry_points

import pytest

from asyncpool import PoolConfig
from asyncpool.cli import build_parser, main
from asyncpool.cli._args import UsageError, config_from_args, parse_config_spec, pool_settings
from asyncpool.cli._live import PlainLines, frame
from asyncpool.cli._profile import Profile
from asyncpool.cli._report import Output
from asyncpool.cli._series import RequestRecord, Run, Sample, peak_in_use, quantile
from asyncpool.cli._sizing import Target, advise
from asyncpool.cli.simulate import DEFAULTS

COMMANDS = ("simulate", "advise", "check")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ASYNCPOOL_* pool settings or DATABASE_URL from the caller's shell leak in."""
    import os

    for key in list(os.environ):
        if key.startswith("ASYNCPOOL_") and key != "ASYNCPOOL_TEST_DSN":
            monkeypatch.delenv(key)
    monkeypatch.delenv("DATABASE_URL", raising=False)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv, stdout=io.StringIO())
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_console_script_is_the_cli_main() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "asyncpool"]
    assert script.load() is main


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_has_help_that_describes_it(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: asyncpool {command}")
    assert {"simulate": "spike", "advise": "Little's law", "check": "pooler"}[command] in out


def test_top_level_help_lists_the_three_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for command in COMMANDS:
        assert command in out


def test_every_pool_setting_is_a_simulate_flag_with_its_comment_as_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_main(["simulate", "--help"], capsys)
    assert code == 0
    names = [f.name for f in dataclasses.fields(PoolConfig)]
    assert [s.name for s in pool_settings()] == names
    for setting in pool_settings():
        assert setting.doc, f"PoolConfig.{setting.name} has no #: comment to use as help"
        assert setting.flag in out
        assert setting.variable in out


def test_bad_flag_value_is_an_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["simulate", "--pool-size", "many"], capsys)
    assert code == 2
    assert "argument --pool-size: expected an integer, got 'many'" in err


def test_out_of_range_flag_is_an_error_naming_the_flag_and_range(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_main(["simulate", "--pool-size", "0"], capsys)
    assert code == 2
    assert "argument --pool-size: must be an integer from 1 to 10000, got 0" in err


def test_misspelt_flag_is_named_with_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["simulate", "--pool-sise", "5"], capsys)
    assert code == 2
    assert "unrecognized arguments: --pool-sise" in err
    assert "did you mean --pool-size?" in err


def test_bad_environment_variable_is_an_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ASYNCPOOL_MAX_OVERFLOW", "lots")
    code, _, err = run_main(["simulate"], capsys)
    assert code == 2
    assert "ASYNCPOOL_MAX_OVERFLOW" in err


def test_environment_is_the_base_and_flags_override_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCPOOL_POOL_SIZE", "7")
    monkeypatch.setenv("ASYNCPOOL_MAX_OVERFLOW", "1")
    args = build_parser().parse_args(
        ["simulate", "--max-overflow", "3", "--pool-recycle", "none", "--no-pre-ping"]
    )
    config = config_from_args(args, DEFAULTS)
    assert (config.pool_size, config.max_overflow) == (7, 3)
    assert config.pool_timeout == DEFAULTS["pool_timeout"]  # the simulation's demo default
    assert config.pool_recycle is None
    assert config.pre_ping is False


@pytest.mark.parametrize(
    ("spec", "label", "expected"),
    [
        ("5/0", "5/0", {"pool_size": 5, "max_overflow": 0}),
        ("10/20/30", "10/20/30", {"pool_size": 10, "max_overflow": 20, "pool_timeout": 30.0}),
        (
            "pool_size=4,max-overflow=2,pre_ping=off",
            "pool_size=4,max_overflow=2,pre_ping=off",
            {"pool_size": 4, "max_overflow": 2, "pre_ping": False},
        ),
    ],
)
def test_compare_configurations_accept_shorthand_and_settings(
    spec: str, label: str, expected: dict[str, object]
) -> None:
    got_label, config = parse_config_spec(spec, PoolConfig(pool_timeout=3))
    assert got_label == label
    for key, value in expected.items():
        assert getattr(config, key) == value


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("5/x", "--compare '5/x': max_overflow must be an integer, got 'x'"),
        ("pool_sise=5", "'pool_sise' is not a pool setting (did you mean pool_size?)"),
        ("0/0", "--compare '0/0': pool_size: must be an integer from 1 to 10000, got 0"),
        ("1/2/3/4", "expected POOL_SIZE/MAX_OVERFLOW[/POOL_TIMEOUT]"),
    ],
)
def test_bad_compare_configuration_is_an_error_naming_it(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match="argument --compare") as info:
        parse_config_spec(spec, PoolConfig())
    assert message in str(info.value)


def test_compare_needs_at_least_two_configurations(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["simulate", "--compare", "5/0"], capsys)
    assert code == 2
    assert "argument --compare: expected 2 to 4 configurations, got 1" in err


def test_plot_file_type_is_checked_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_main(["simulate", "--plot", "chart.pdf"], capsys)
    assert code == 2
    assert "argument --plot: expected a file ending in .png or .html" in err


def test_negative_profile_values_are_errors_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_main(["simulate", "--spike-rate", "-5"], capsys)
    assert code == 2
    assert "argument --spike-rate" in err


def test_advise_needs_a_peak_and_names_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["advise", "--hold", "0.1"], capsys)
    assert code == 2
    assert "--peak-rps" in err and "--peak-concurrent" in err


def test_check_without_url_or_database_url_names_the_argument(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_main(["check"], capsys)
    assert code == 2
    assert "argument URL: give a database URL or set DATABASE_URL" in err


def test_profile_arrivals_follow_the_rates_and_repeat_for_a_seed() -> None:
    profile = Profile.spike(rate=10, before=2, spike_rate=100, spike=3, after=1)
    times = profile.arrival_times()
    assert times == profile.arrival_times()
    assert times == sorted(times) and 0 < times[0] and times[-1] < profile.duration
    in_spike = [t for t in times if 2 <= t < 5]
    assert 240 <= len(in_spike) <= 360  # 300 expected; Poisson spread is about 17
    even = dataclasses.replace(profile, arrivals="even").arrival_times()
    assert len(even) == 10 * 2 + 100 * 3 + 10 * 1
    assert profile.rate_at(1.0) == 10 and profile.rate_at(2.5) == 100 and profile.rate_at(9) == 0
    assert profile.phase_at(5.5) is not None and profile.phase_at(6.0) is None


def test_quantiles_are_nearest_rank_and_peak_in_use_is_exact() -> None:
    assert quantile([], 0.5) is None
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
    requests = [
        RequestRecord(arrival=0.0, wait=0.0, hold=1.0, outcome="served"),
        RequestRecord(arrival=0.5, wait=0.0, hold=1.0, outcome="served"),
        RequestRecord(arrival=1.0, wait=0.0, hold=1.0, outcome="served"),  # starts as #1 ends
        RequestRecord(arrival=0.2, wait=3.0, outcome="timed_out"),  # never held one
    ]
    assert peak_in_use(requests) == 2


def test_advice_follows_littles_law_and_shows_each_step() -> None:
    advice = advise(Target(hold=0.1, processes=4, peak_rps=120, cores=2, max_connections=100))
    # 120 req/s x 0.1 s = 12 busy; 3 per process; 3 + 3 x sqrt(3) = 8.2 -> 9 at most.
    assert (advice.pool_size, advice.max_overflow) == (3, 6)
    assert advice.pool_timeout == 5.0  # half of the 10 s request deadline
    assert advice.max_waiting == 450  # 9 connections / 0.1 s x 5 s
    assert advice.fleet_max == 36 and advice.server_budget == 95
    assert advice.hikari_connections == 5
    text = "\n".join(advice.steps)
    assert "120 req/s x 0.1 s = 12.0" in text and "2 x 2 + 1 = 5" in text
    assert any("HikariCP" in w for w in advice.warnings)  # 12 busy > 5


def test_advice_caps_a_fleet_that_would_exceed_the_server() -> None:
    advice = advise(
        Target(hold=0.05, processes=16, peak_rps=2000, max_connections=100, reserved_slots=3)
    )
    assert advice.server_budget == 92
    assert advice.fleet_max <= 92 and advice.max_size == 92 // 16
    assert any("more than the server's 92" in w for w in advice.warnings)
    assert any("cannot keep up" in w for w in advice.warnings)  # 80 < 100 busy


def test_advise_prints_json_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    stdout = io.StringIO()
    code = main(["advise", "--peak-concurrent", "12", "--hold", "0.1", "--json"], stdout=stdout)
    assert code == 0
    data = json.loads(stdout.getvalue())
    assert data["settings"]["pool_size"] == 12 and data["server"] is None


def _run_with_sample(waiting: int, timed_out: int) -> tuple[Run, Sample]:
    run = Run("5/0", PoolConfig(pool_size=5, max_overflow=0, pool_timeout=3), Profile.spike(
        rate=8, before=3, spike_rate=120, spike=6, after=3
    ))  # fmt: skip
    sample = Sample(
        t=5.0, offered=120, arrival_rate=118, checked_out=5, idle=0, overflow=0, connects=5,
        waiting=waiting, size=5, wait_p50=0.8, wait_p99=1.4, wait_max=1.5, oldest_waiter=1.6,
        served=300, timed_out=timed_out, rejected=0, errors=0, in_flight=waiting + 5,
    )  # fmt: skip
    return run, sample


def test_live_frame_shows_connections_waiters_waits_and_timeouts() -> None:
    from rich.console import Console

    run, sample = _run_with_sample(waiting=212, timed_out=31)
    console = Console(file=io.StringIO(), width=140, record=True)
    console.print(frame(run, sample, peak_waiting=212))
    text = console.export_text()
    for expected in ("spike", "checked out", "5 of 5", "waiting", "212", "p99 1.40 s",
                     "timed out 31", "pool_timeout=3"):  # fmt: skip
        assert expected in text


def test_plain_lines_print_once_per_interval() -> None:
    run, sample = _run_with_sample(waiting=3, timed_out=0)
    buffer = io.StringIO()
    lines = PlainLines(Output(buffer), every=1.0)
    lines.begin(run)
    for i in range(25):  # 2.5 s of samples at 10 per second
        lines.update(run, dataclasses.replace(sample, t=i / 10))
    printed = buffer.getvalue().splitlines()
    assert len(printed) == 3
    assert "waiting    3" in printed[0] and "timed out    0" in printed[0]


def test_live_view_draws_on_a_terminal_and_leaves_the_last_frame() -> None:
    from rich.console import Console

    from asyncpool.cli._live import LiveView

    run, sample = _run_with_sample(waiting=40, timed_out=7)
    buffer = io.StringIO()
    out = Output(buffer)
    out.console = Console(file=buffer, force_terminal=True, width=90)
    view = LiveView(out)
    view.begin(run)
    view.update(run, sample)
    view.end()
    text = buffer.getvalue()
    assert "asyncpool simulate · 5/0" in text and "timed out 7" in text and "40" in text


def test_verdict_blames_the_pool_only_when_the_pool_was_the_limit() -> None:
    from asyncpool.cli._report import verdict

    run, _ = _run_with_sample(waiting=0, timed_out=0)
    run.requests = [RequestRecord(0.0, 3.0, None, "timed_out") for _ in range(3)]
    run.requests += [RequestRecord(0.0, 0.0, 0.1, "served")]
    assert "this pool has at most 5" in verdict(run)  # 120 x 0.1 = 12 > 5
    run.requests = [RequestRecord(0.0, 0.0, 0.01, "error") for _ in range(4)]
    assert "the pool was not the limit" in verdict(run)
    run.requests = [RequestRecord(0.0, 0.0, 0.1, "served")]
    assert verdict(run).startswith("5/0: every request served")
