"""Which database the command talks to, and how its failures are told without secrets.

``--url`` wins, then ``DATABASE_URL``; with neither, an embedded PostgreSQL
(extra ``embedded``) is started for the duration of the command, so the
simulation runs on a machine with no database installed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from .._url import redact_url, scrub, secrets_of
from ..errors import AsyncPoolError

__all__ = ["Database", "describe_failure", "open_database"]

ENV_URL: Final = "DATABASE_URL"


class DatabaseSetupError(AsyncPoolError):
    """No database could be had: the embedded server would not start, or the extra is missing."""


@dataclass(frozen=True, slots=True)
class Database:
    """A URL to connect with (it may hold a password: show ``shown``, never ``url``)."""

    url: str
    source: str  # "--url", "DATABASE_URL" or "embedded"

    @property
    def shown(self) -> str:
        return redact_url(self.url)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The password and every secret query value in the URL, to scrub from output."""
        return secrets_of(self.url)


@contextlib.contextmanager
def open_database(url: str | None, *, say: Callable[[str], None]) -> Iterator[Database]:
    """The database to use; an embedded one is started here and removed on exit."""
    if url:
        yield Database(url, "--url")
        return
    env = os.environ.get(ENV_URL)
    if env:
        yield Database(env, ENV_URL)
        return
    try:
        from ..embedded import EmbeddedPostgres

        server = EmbeddedPostgres()
    except AsyncPoolError as exc:
        raise DatabaseSetupError(
            f"no --url and no {ENV_URL}, and the embedded PostgreSQL is unavailable: {exc}"
        ) from None
    say(f"No --url or {ENV_URL}: starting an embedded PostgreSQL (removed at the end) ...")
    try:
        server.start()
    except AsyncPoolError as exc:
        server.cleanup()
        raise DatabaseSetupError(f"the embedded PostgreSQL did not start: {exc}") from None
    try:
        yield Database(server.url(), "embedded")
    finally:
        server.cleanup()


def describe_failure(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """``ClassName: reason`` of a connect or query failure, without any secret.

    SQLAlchemy wraps the driver's error; the driver's own class says more
    (``InvalidPasswordError``) than the wrapper's (``DBAPIError``).
    """
    inner: BaseException = exc
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        inner = orig.__cause__ if isinstance(orig.__cause__, BaseException) else orig
    message = str(inner).splitlines()[0] if str(inner) else ""
    if isinstance(inner, TimeoutError) and not message:
        message = "timed out"
    text = f"{type(inner).__name__}: {message}" if message else type(inner).__name__
    return scrub(text, secrets=secrets)
