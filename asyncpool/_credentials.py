"""Rotating credentials: a password asked for at every new connection.

RDS IAM tokens, Entra ID tokens and Vault leases expire; a password baked
into the URL cannot follow them. ``create_pooled_engine(url, password=...)``
takes a string, or a sync or async callable returning one, called for every
new connection (reconnects and refills included), as HikariCP 7's
credentials provider and psycopg_pool 3.3's callable ``kwargs`` do. The value
goes to the driver only: never into the URL, a log, an error or a metric.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only

from ._validate import check_seconds
from .config import PoolConfig
from .errors import ConfigurationError

__all__ = ["Password", "check_password", "install_password", "recycle_within"]

#: What ``create_pooled_engine(password=...)`` takes.
Password: TypeAlias = str | Callable[[], str] | Callable[[], Awaitable[str]]


def check_password(password: object, url: URL, lifetime: object) -> None:
    """Before any connection: the kinds accepted, and one source of the password."""
    check_seconds("password_lifetime", lifetime, allow_zero=False, optional=True)
    if password is None:
        return
    if not (isinstance(password, str) or callable(password)):
        # The value itself is never shown: it may be a secret of the wrong type.
        raise ConfigurationError(
            "password",
            f"<{type(password).__name__}>",
            "a string, or a sync or async callable returning one",
        )
    if url.password is not None:
        raise ConfigurationError(
            "password", "<given>", "given once: the URL has a password too; drop one"
        )


def recycle_within(config: PoolConfig, lifetime: float | None) -> PoolConfig:
    """Connections replaced before their credentials expire: ``pool_recycle``
    at most ``lifetime`` (the jitter takes each one below it)."""
    if lifetime is None or (config.pool_recycle is not None and config.pool_recycle <= lifetime):
        return config
    return config.replace(pool_recycle=lifetime)


def install_password(engine: AsyncEngine, password: Password) -> None:
    """Give every new connection of ``engine`` the password as it is now."""

    def on_connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams["password"] = _current(password)

    event.listen(engine.sync_engine, "do_connect", on_connect)


def _current(password: Password) -> str:
    if isinstance(password, str):
        return password
    value: Any = password()
    if inspect.isawaitable(value):
        value = await_only(value)  # in the pool's connect task, on its loop
    if not isinstance(value, str):
        raise ConfigurationError(
            "password", f"<{type(value).__name__} returned>", "a callable returning a string"
        )
    return value
