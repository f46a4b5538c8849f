"""URLs: one redaction for everything printed, and libpq parameters translated or refused.

Refusals happen when the engine is created, before any connection opens (the
hosts below do not exist).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncpool import ConfigurationError, create_pooled_engine
from asyncpool._url import SSLMODES, redact_url, scrub, translate_query
from asyncpool.engine import parse_url, pool_of

USERINFO = "Us3r-Inf0-pw"
QUERY = "Qu3ry-pw"
SSLPW = "Ssl-K3y-pw"
BASE = "postgresql+asyncpg://app@db.invalid:5432/app"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        (f"postgresql+asyncpg://app:{USERINFO}@db.invalid/app", USERINFO),
        (f"{BASE}?password={QUERY}", QUERY),
        (f"{BASE}?sslpassword={SSLPW}&sslmode=require", SSLPW),
        (f"{BASE}?api_token={QUERY}", QUERY),
        ("postgresql+asyncpg://app:p%40ss%2Fw0rd@db.invalid/app", "p@ss/w0rd"),
    ],
)
def test_redact_url_masks_every_secret_however_it_is_given(url: str, secret: str) -> None:
    shown = redact_url(url)
    assert secret not in shown and "***" in shown
    assert "db.invalid" in shown


def test_redact_url_of_text_that_is_not_a_url_shows_nothing_of_it() -> None:
    assert redact_url("host=db password=Qu3ry-pw") == "<unparseable URL>"


def test_scrub_removes_secrets_raw_percent_encoded_and_url_shaped() -> None:
    url = "postgresql+asyncpg://app:p%40ss@db.invalid/app?sslpassword=k3y"
    text = "failed: p@ss p%40ss k3y; also postgres://u:other@h/db and host=h password=xyz"
    cleaned = scrub(text, [url])
    for secret in ("p@ss", "p%40ss", "k3y", "other", "xyz"):
        assert secret not in cleaned


def test_a_password_in_the_query_moves_to_the_url_and_leaves_no_trace_in_reprs() -> None:
    engine = create_pooled_engine(f"{BASE}?password={QUERY}", telemetry=False)
    assert engine.url.password == QUERY
    assert "password" not in engine.url.query
    for shown in (repr(engine), repr(engine.sync_engine), str(engine.url), repr(pool_of(engine))):
        assert QUERY not in shown


@pytest.mark.parametrize("mode", SSLMODES)
def test_every_sslmode_is_translated_for_asyncpg(mode: str) -> None:
    url, options = parse_url(f"{BASE}?sslmode={mode}")
    assert "sslmode" not in url.query
    if mode == "disable":
        assert options.connect_args == {"ssl": False}
    else:
        assert options.connect_args == {"dsn": f"postgresql://?sslmode={mode}"}


def test_libpq_parameters_become_settings_and_driver_arguments() -> None:
    engine = create_pooled_engine(
        f"{BASE}?connect_timeout=5&application_name=web&options=-c%20statement_timeout%3D5s"
        "&target_session_attrs=read-write&statement_cache_size=0&command_timeout=2.5",
        telemetry=False,
    )
    config = pool_of(engine).state.config
    assert (config.connect_timeout, config.application_name, config.command_timeout) == (
        5.0,
        "web",
        2.5,
    )
    assert engine.url.query == {}


def test_a_timeout_in_the_url_is_not_silently_overridden() -> None:
    engine = create_pooled_engine(f"{BASE}?timeout=1", telemetry=False)
    assert pool_of(engine).state.config.connect_timeout == 1.0


def test_a_url_setting_that_clashes_with_an_explicit_one_names_both() -> None:
    with pytest.raises(ConfigurationError, match="connect_timeout") as caught:
        create_pooled_engine(f"{BASE}?connect_timeout=5", connect_timeout=3, telemetry=False)
    assert "URL parameter" in str(caught.value) and "3" in str(caught.value)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("sslmode=required", "sslmode"),
        ("sslmode=require&sslrootcert=/nonexistent/root.crt", "sslrootcert"),
        ("connect_timeout=0", "connect_timeout"),
        ("connect_timeout=inf", "connect_timeout"),
        ("timeout=abc", "timeout"),
        ("statement_cache_size=-1", "statement_cache_size"),
        ("statement_cache_size=ten", "statement_cache_size"),
        ("prepared_statement_cache_size=x", "prepared_statement_cache_size"),
        ("target_session_attrs=leader", "target_session_attrs"),
        ("gssencmode=disable", "gssencmode"),
        ("keepalives=1", "keepalives"),
        ("application_name=caf%C3%A9%0A", "application_name"),
        ("connect_timeout=1&timeout=2", "timeout"),
        ("sslmode=require&sslmode=disable", "sslmode"),
        ("user=other", "user"),
    ],
)
def test_a_url_parameter_asyncpg_would_refuse_is_named_at_engine_creation(
    query: str, named: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        create_pooled_engine(f"{BASE}?{query}", telemetry=False)
    assert repr(named) in str(caught.value)


def test_an_unknown_secret_parameter_is_refused_without_its_value() -> None:
    with pytest.raises(ConfigurationError) as caught:
        create_pooled_engine(f"{BASE}?client_secret={QUERY}", telemetry=False)
    assert "client_secret" in str(caught.value) and QUERY not in str(caught.value)


def test_ssl_files_that_exist_pass_through_to_asyncpg(tmp_path: Path) -> None:
    root = tmp_path / "root.crt"
    root.write_text("not checked here")
    url, options = parse_url(f"{BASE}?sslmode=verify-full&sslrootcert={root}")
    assert options.connect_args["dsn"].startswith("postgresql://?sslmode=verify-full&sslrootcert=")
    assert url.query == {}


def test_the_pgbouncer_preset_refuses_a_statement_cache_in_the_url() -> None:
    with pytest.raises(ConfigurationError, match="statement_cache_size"):
        create_pooled_engine(
            f"{BASE}?statement_cache_size=100", pooler="pgbouncer", telemetry=False
        )


def test_query_parameters_sqlalchemy_reads_itself_stay_in_the_url() -> None:
    url, _ = translate_query(parse_url(f"{BASE}?host=/var/run/postgresql")[0])
    assert url.query == {"host": "/var/run/postgresql"}
