"""The asyncpool command end to end against the test database: simulate (series, charts, the seed
story), the embedded fallback, check (direct, proxied, behind PgBouncer) and advise --url."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from asyncpool.cli import main
from asyncpool.embedded import free_port
from tests.fix_db import TestDatabase
from tests.fix_pgbouncer import PgBouncer
from tests.fix_proxy import FaultProxy, proxied_url

#: A short spike: 0.5 s quiet, 1.5 s at 80 req/s, 0.5 s quiet.
SHORT = ["--rate", "10", "--before", "0.5", "--spike-rate", "80", "--spike", "1.5"]
SHORT += ["--after", "0.5", "--hold", "0.02"]

PASSWORD = "s3cret-Pa55"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("ASYNCPOOL_") and key != "ASYNCPOOL_TEST_DSN":
            monkeypatch.delenv(key)
    monkeypatch.delenv("DATABASE_URL", raising=False)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    stdout = io.StringIO()
    code = main(argv, stdout=stdout)
    return code, stdout.getvalue(), capsys.readouterr().err


def unreachable_url() -> str:
    return f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/app"


def test_simulate_writes_the_json_series_and_a_png_and_an_html_chart(
    database: TestDatabase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series, png, html = tmp_path / "run.json", tmp_path / "run.png", tmp_path / "run.html"
    argv = ["simulate", "--url", database.url, *SHORT, "--pool-size", "3", "--max-overflow", "2"]
    argv += ["--json", str(series), "--plot", str(png), "--plot", str(html)]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err

    data = json.loads(series.read_text())
    assert data["version"] == 1
    assert [p["rate"] for p in data["profile"]["phases"]] == [10, 80, 10]
    (run,) = data["runs"]
    assert run["label"] == "3/2" and run["config"]["pool_size"] == 3
    samples, requests, summary = run["samples"], run["requests"], run["summary"]
    assert len(samples["t"]) >= 20  # ten a second over 2.5 s, and the drain
    assert samples["t"] == sorted(samples["t"])
    assert max(samples["checked_out"]) <= 5 and max(samples["size"]) <= 5
    assert max(samples["offered"]) == 80
    assert len(requests["arrival"]) == summary["requests"] > 50
    assert (
        summary["served"]
        + summary["timed_out"]
        + summary["rejected"]
        + summary["errors"]
        + summary["unfinished"]
        == summary["requests"]
    )
    assert summary["served"] > 0 and summary["peak_in_use"] <= 5
    assert summary["wait_p50"] <= summary["wait_p99"] <= summary["wait_max"]
    # Connections opened: no more than were ever open at once (they linger
    # idle_timeout instead of churning), and the count is in the table.
    assert 1 <= summary["connects"] <= summary["peak_open"]
    assert samples["connects"] == sorted(samples["connects"])
    assert "connections opened" in out and "open at the end" in out

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 30_000  # four rows of lines, not an empty canvas
    page = html.read_text()
    assert "<html>" in page and "Plotly.newPlot" in page
    for name in ("in use", "waiting", "wait p99 (last 1 s)", "pool_size + max_overflow = 5"):
        assert name in page

    assert "summary" in out and "wait p99" in out and "peak connections in use" in out
    assert f"chart written to {png}" in out


@pytest.mark.slow  # the main pass runs it; the other passes deselect it
def test_seed_configurations_compared_time_out_with_5_0_and_never_with_10_20(
    database: TestDatabase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The seed's story, shortened: quiet at 8 req/s, then 120 req/s; each
    # request holds its connection 0.1 s, so the spike keeps 12 busy.
    series = tmp_path / "compare.json"
    argv = ["simulate", "--url", database.url, "--compare", "5/0", "10/20"]
    argv += ["--rate", "8", "--before", "0.5", "--spike-rate", "120", "--spike", "2.5"]
    argv += ["--after", "0.5", "--hold", "0.1", "--pool-timeout", "1", "--json", str(series)]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err

    small, tuned = json.loads(series.read_text())["runs"]
    assert (small["label"], tuned["label"]) == ("5/0", "10/20")
    assert len(small["requests"]["arrival"]) == len(tuned["requests"]["arrival"])  # same seed
    assert small["summary"]["timed_out"] > 0
    assert small["summary"]["peak_in_use"] == 5
    assert tuned["summary"]["timed_out"] == 0
    assert tuned["summary"]["served"] == tuned["summary"]["requests"]
    assert tuned["summary"]["peak_in_use"] > 5  # it needed more than the small pool had
    assert "5/0:" in out and "this pool has at most 5" in out
    assert "10/20: every request served" in out


def test_simulate_starts_an_embedded_postgres_without_a_url_and_removes_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A temporary directory of our own: other test sessions on the machine
    # start and remove embedded servers in the shared one meanwhile. It must
    # be traversable by the unprivileged user the server runs as under root.
    base = Path(tempfile.mkdtemp(prefix="asyncpool-cli-test-"))
    base.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    try:
        argv = ["simulate", "--rate", "20", "--before", "0.3", "--spike", "0", "--after", "0"]
        code, out, err = run_cli([*argv, "--hold", "0.01"], capsys)
        assert code == 0, err
        assert "starting an embedded PostgreSQL" in out
        assert "database: embedded PostgreSQL" in out
        assert "every request served" in out
        assert list(base.iterdir()) == []  # stopped, and its directory removed
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_simulate_exits_nonzero_with_the_reason_and_no_password_when_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_cli(["simulate", "--url", unreachable_url()], capsys)
    assert code == 1
    assert "cannot reach postgresql://app:***@127.0.0.1:" in err
    assert "ConnectionRefusedError" in err
    assert PASSWORD not in err + out


def _check_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run_cli(["check", *argv, "--json"], capsys)
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def test_check_reports_version_latency_budget_and_a_direct_connection(
    database: TestDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    max_connections = int(asyncio.run(database.fetchval("SHOW max_connections")))
    report = _check_json([database.url, "--processes", "4"], capsys)
    assert report["pooler"] == "direct"
    assert report["version"]
    assert 0 < report["round_trip"] < report["connect"]
    assert report["facts"]["max_connections"] == max_connections
    budget = report["recommended"]["max connections per process (pool_size + max_overflow)"]
    facts = report["facts"]
    free = max_connections - facts["superuser_reserved"] - facts["reserved"] - 5
    assert budget == max(free - sum(u["count"] for u in facts["usage"]), 0) // 4


def test_check_reports_a_proxy_between_client_and_server(
    database: TestDatabase, fault_proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _check_json([proxied_url(database, fault_proxy)], capsys)
    assert report["pooler"] == "proxy or session pooler"
    assert "not from our socket" in report["pooler_evidence"][0]


def test_check_detects_a_transaction_pooler_and_recommends_pooler_pgbouncer(
    pgbouncer: PgBouncer, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _check_json([pgbouncer.url()], capsys)
    assert report["pooler"] == "transaction pooler"
    assert "same server backend" in report["pooler_evidence"][0]
    assert report["recommended"]["pooler"] == "pgbouncer"


def test_check_exits_nonzero_with_the_reason_and_no_password_when_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_cli(["check", unreachable_url(), "--timeout", "3"], capsys)
    assert code == 1
    assert "cannot reach postgresql://app:***@127.0.0.1:" in err
    assert "ConnectionRefusedError" in err
    assert PASSWORD not in err + out


def test_advise_reads_the_server_budget_and_caps_a_fleet_that_would_exceed_it(
    database: TestDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["advise", "--peak-rps", "5000", "--hold", "0.05", "--processes", "40"]
    code, out, err = run_cli([*argv, "--url", database.url, "--json"], capsys)
    assert code == 0, err
    advice = json.loads(out)
    server = advice["server"]
    assert server["max_connections"] > 0 and server["cores"] >= 1
    assert advice["server_budget"] == (
        server["max_connections"]
        - server["superuser_reserved_connections"]
        - server["reserved_connections"]
        - 5
    )
    assert advice["fleet_max"] <= advice["server_budget"]
    assert any("more than the server's" in w for w in advice["warnings"])
