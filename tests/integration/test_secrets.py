"""No secret appears in anything asyncpool, the engine or the command emits.

Distinct secrets are planted in every place a URL can carry one (the
user-info, ``?password=``, ``?sslpassword=``, and percent-encoded), then
every output is searched: logs at DEBUG, errors with their causes, reprs,
spans, span events and metrics, ``statistics()``, budget explanations, every
CLI subcommand in text and ``--json``, and the charts.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from urllib.parse import quote

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.engine import make_url

import asyncpool
from asyncpool import PoolTimeoutError, create_pooled_engine, statistics
from asyncpool.cli import main
from asyncpool.embedded import free_port
from asyncpool.engine import redact_url
from asyncpool.telemetry import instrument
from tests.fix_db import CONNECT_ERROR, TestDatabase

#: One secret per place; each must be found nowhere.
USERINFO = "Us3rInfo-xyzzy"
QUERY = "Qu3ryPw-plugh"
SSLKEY = "SslKeyPw-frotz"
ENCODED = "p@ss/Enc0ded-quux"  # percent-encoded in the URL
SECRETS = (USERINFO, QUERY, SSLKEY, ENCODED, quote(ENCODED, safe=""))


def planted_urls(base: str) -> list[str]:
    """The test database URL with a secret in each place a URL carries one.

    The test server trusts local connections: the secrets are never checked,
    but they still travel through every layer that could leak them.
    """
    url = make_url(base)
    plain = url.set(password=None).render_as_string(hide_password=False)
    return [
        url.set(password=USERINFO).render_as_string(hide_password=False)
        + f"?sslmode=prefer&sslpassword={SSLKEY}",
        f"{plain}?password={QUERY}",
        url.set(password=ENCODED).render_as_string(hide_password=False),
    ]


def unreachable(url: str) -> str:
    return (
        make_url(url).set(host="127.0.0.1", port=free_port()).render_as_string(hide_password=False)
    )


def error_chain(exc: BaseException) -> list[str]:
    seen: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 20:
        seen += [str(current), repr(current), repr(getattr(current, "args", ()))]
        current = current.__cause__ or current.__context__
    return seen


def assert_no_secret(outputs: list[str]) -> None:
    hits = [(secret, out[:200]) for out in outputs for secret in SECRETS if secret in out]
    assert hits == []


async def test_no_secret_in_logs_reprs_errors_telemetry_statistics_or_budget(
    database: TestDatabase,
    app_name: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # everything SQLAlchemy and asyncpool log
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    outputs: list[str] = []
    for number, url in enumerate(planted_urls(database.url)):
        engine = create_pooled_engine(
            url,
            pool_size=1,
            max_overflow=0,
            pool_timeout=0.1,
            application_name=f"{app_name[:50]}-{number}",
            engine_options={"echo": "debug", "echo_pool": "debug"},
            telemetry=False,
        )
        handle = instrument(engine, meter_provider, tracer_provider, spans="all")
        outputs += [repr(engine), str(engine.url), repr(engine.url), repr(engine.sync_engine)]
        outputs += [repr(engine.sync_engine.pool), repr(engine.sync_engine.pool.state.config)]
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            with pytest.raises(PoolTimeoutError) as timeout:
                await engine.connect()
            outputs += error_chain(timeout.value)
            with pytest.raises(Exception) as sql_error:
                await conn.execute(text("SELECT * FROM no_such_table_for_secrets"))
            outputs += error_chain(sql_error.value)
        outputs.append(repr(statistics(engine)))
        budget = await asyncpool.connection_budget(engine, processes=2)
        outputs += [budget.explain(), str(budget), repr(budget)]
        metrics_data = reader.get_metrics_data()
        assert metrics_data is not None
        outputs.append(metrics_data.to_json())
        handle.uninstrument()
        await engine.dispose()

        refused = create_pooled_engine(unreachable(url), connect_timeout=1, telemetry=False)
        with pytest.raises(CONNECT_ERROR) as down:
            await refused.connect()
        outputs += error_chain(down.value)
        await refused.dispose()
        with pytest.raises(asyncpool.DatabaseUnavailableError) as warm:
            async with asyncpool.pool_lifespan(
                create_pooled_engine(unreachable(url), telemetry=False), warm_timeout=0.3
            ):
                pass
        outputs += error_chain(warm.value)

        for bad in (
            url.replace(f"postgresql+{database.driver}", "mysql+aiomysql"),
            url + ("&" if "?" in url else "?") + "sslmode=bogus",
            url + ("&" if "?" in url else "?") + "keepalives=1",
            url.replace("@127.0.0.1", "@127.0.0.1:notaport"),
        ):
            with pytest.raises(asyncpool.ConfigurationError) as refused_config:
                create_pooled_engine(bad, telemetry=False)
            outputs += error_chain(refused_config.value)
        outputs.append(redact_url(url))

    for span in exporter.get_finished_spans():
        outputs.append(span.to_json())
    assert exporter.get_finished_spans(), "no span: the span check would prove nothing"
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err, caplog.text]
    outputs += [str(record.args) for record in caplog.records]
    assert caplog.records, "the engine logged nothing: the log check would prove nothing"
    assert_no_secret(outputs)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    code = main(argv, stdout=stdout)
    captured = capsys.readouterr()
    return code, stdout.getvalue() + captured.out + captured.err


@pytest.mark.slow  # the main pass runs it; the other passes deselect it
def test_no_secret_in_any_subcommand_text_json_or_chart(
    database: TestDatabase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in list(os.environ):
        if key.startswith("ASYNCPOOL_") and key != "ASYNCPOOL_TEST_DSN":
            monkeypatch.delenv(key)
    outputs: list[str] = []
    short = ["--rate", "10", "--before", "0.2", "--spike-rate", "20", "--spike", "0.3"]
    short += ["--after", "0.2", "--hold", "0.01", "--plain"]
    for number, url in enumerate(planted_urls(database.url)):
        for target in (url, unreachable(url)):
            for json_flag in ([], ["--json"]):
                code, out = run_cli(["check", target, "--timeout", "2", *json_flag], capsys)
                outputs.append(out)
                code, out = run_cli(
                    ["advise", "--peak-rps", "50", "--hold", "0.05", "--url", target, *json_flag],
                    capsys,
                )
                outputs.append(out)
        series = tmp_path / f"run{number}.json"
        html = tmp_path / f"run{number}.html"
        png = tmp_path / f"run{number}.png"
        argv = ["simulate", "--url", url, *short, "--json", str(series)]
        code, out = run_cli([*argv, "--plot", str(html), "--plot", str(png)], capsys)
        assert code == 0, out
        outputs += [out, series.read_text(), html.read_text(errors="replace")]
        outputs.append(png.read_bytes().decode("latin-1"))
        code, out = run_cli(["simulate", "--url", unreachable(url), *short], capsys)
        assert code == 1
        outputs.append(out)
        monkeypatch.setenv("DATABASE_URL", unreachable(url))
        code, out = run_cli(["simulate", *short], capsys)
        outputs.append(out)
        monkeypatch.delenv("DATABASE_URL")
        code, out = run_cli(["check", url + ("&" if "?" in url else "?") + "sslmode=x"], capsys)
        assert code == 2
        outputs.append(out)
    assert_no_secret(outputs)
