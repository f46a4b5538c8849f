"""Every code block of README.md and docs/ runs as a test (sybil).

- ```python blocks each run on their own, as a reader would paste them, in a
  fresh namespace, with ``DATABASE_URL`` set to the test database (what
  ``ASYNCPOOL_TEST_DSN`` names, else the embedded PostgreSQL of
  ``tests.fix_db``). A block that leaves a Starlette/FastAPI ``app`` is then
  served through its lifespan and ``GET /health`` must answer 200.
- ```output blocks are what the python block before them prints, exactly
  (trailing spaces aside); ```output-numbers-vary blocks are the same text
  with numbers that come from the server (connections in use, timings),
  so any number matches there.
- ```bash blocks run with ``bash -euo pipefail`` unless their first line is a
  comment that starts with ``# not run by the tests:`` and says why.

Other fences (``text``) are not code.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sybil import Example, Sybil
from sybil.integration.pytest import SybilItem
from sybil.parsers.markdown import CodeBlockParser

from tests.fix_db import TestDatabase

NOT_RUN = "# not run by the tests:"
OUTPUT_KEY = "__example_output__"
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _reported(evaluator: Callable[[Example], None]) -> Callable[[Example], str | None]:
    """Sybil reports a returned string as the example's failure: the whole traceback."""

    def evaluate(example: Example) -> str | None:
        try:
            evaluator(example)
        except Exception:
            return traceback.format_exc()
        return None

    return evaluate


async def _serve_health(app: Any) -> None:
    """The app's lifespan, and ``GET /health`` through ASGI, as uvicorn would."""
    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.get("/health")
            assert response.status_code == 200, response.text


def _run_python(example: Example) -> None:
    source = example.parsed
    namespace: dict[str, Any] = {"__name__": "__example__"}
    buffer = io.StringIO()
    code = compile(source, f"{example.path}:{example.line}", "exec")
    with contextlib.redirect_stdout(buffer):
        exec(code, namespace)
    example.document.namespace[OUTPUT_KEY] = buffer.getvalue()
    app = namespace.get("app")
    if app is not None and type(app).__module__.startswith(("fastapi", "starlette")):
        asyncio.run(_serve_health(app))


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def _check_output(example: Example, *, numbers_vary: bool) -> None:
    printed = example.document.namespace.pop(OUTPUT_KEY, None)
    assert printed is not None, "an output block must follow a python block that printed"
    shown, actual = _lines(example.parsed), _lines(printed)
    if numbers_vary:
        shown = [_NUMBER.sub("N", line) for line in shown]
        actual = [_NUMBER.sub("N", line) for line in actual]
    assert actual == shown, "\n".join(["printed:", *_lines(printed)])


def _run_bash(example: Example) -> None:
    source: str = example.parsed
    if source.lstrip().startswith(NOT_RUN):
        return
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", source],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def docs_database_url(database: TestDatabase) -> Iterator[str]:
    """``DATABASE_URL`` for the examples: the test database, on asyncpg (``postgresql://``)."""
    saved = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = database.dsn
    yield database.dsn
    if saved is None:
        del os.environ["DATABASE_URL"]
    else:
        os.environ["DATABASE_URL"] = saved


def _whole_traceback_when_not_in_an_example(
    self: SybilItem, excinfo: pytest.ExceptionInfo[BaseException]
) -> Any:
    """Sybil cuts tracebacks at its example module and fails (IndexError) on an
    error raised elsewhere (a fixture, a warning turned error after the test): show it whole."""
    try:
        return _sybil_traceback_filter(self, excinfo)
    except IndexError:
        return excinfo.traceback


_sybil_traceback_filter = SybilItem._traceback_filter
SybilItem._traceback_filter = _whole_traceback_when_not_in_an_example  # type: ignore[method-assign]

pytest_collect_file = Sybil(
    parsers=[
        CodeBlockParser("python", _reported(_run_python)),
        CodeBlockParser("output", _reported(lambda e: _check_output(e, numbers_vary=False))),
        CodeBlockParser(
            "output-numbers-vary", _reported(lambda e: _check_output(e, numbers_vary=True))
        ),
        CodeBlockParser("bash", _reported(_run_bash)),
    ],
    patterns=["README.md", "docs/*.md"],
    fixtures=["docs_database_url"],
).pytest()
