"""Driver settings for PgBouncer in transaction mode (``PoolConfig(pooler="pgbouncer")``).

Behind a transaction pooler a client connection gets whichever server
connection is free at the start of each transaction, and in autocommit at
each ``Sync``. A prepared statement made on one server connection is then
missing on the next one ("prepared statement ... does not exist"), and
asyncpg's numbered names (``__asyncpg_stmt_1__``) collide between clients
sharing a server ("... already exists"). What must change, together:

* **Statement caches off.** asyncpg's ``statement_cache_size=0`` and the
  SQLAlchemy dialect's ``prepared_statement_cache_size=0``: a cached statement
  is reused in a later transaction, on another server connection.
* **Statements prepared unnamed.** SQLAlchemy prepares every statement through
  ``prepared_statement_name_func``; asyncpool makes it return ``""``, the
  unnamed statement. With its cache off, asyncpg re-sends the ``Parse`` of
  an unnamed statement in the same message batch as its ``Bind``/``Execute``/
  ``Sync``, so every execution is self-contained on one server connection,
  in a transaction or in autocommit, and nothing is left behind on the server.
  Unique *names* (SQLAlchemy's documented ``uuid4`` recipe) are not enough:
  asyncpg closes dropped statements with a ``Close``+``Sync`` sent between a
  new statement's prepare and its execution, so in autocommit the pooler
  may switch server connections in between. Against PgBouncer 1.18 in
  transaction mode, 4 processes x 800 mixed statements failed 663 times
  with "prepared statement ... does not exist", all in autocommit; with
  unnamed statements, none did.
* **A pre-ping that prepares nothing.** asyncpool's pre-ping is ``SELECT 1``
  on the simple query protocol already (SQLAlchemy's own pre-ping is off).

Settings that would undo this are refused when the engine is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy.engine import URL

from .errors import ConfigurationError

__all__ = ["pgbouncer_connect_args", "unnamed_statement"]

#: Driver options whose only safe value behind a transaction pooler is 0.
_MUST_BE_ZERO: Final = ("statement_cache_size", "prepared_statement_cache_size")

_WHY: Final = (
    "behind PgBouncer in transaction mode a cached or named prepared statement is used "
    "on another server connection; leave it to pooler='pgbouncer'"
)


def unnamed_statement() -> str:
    """``prepared_statement_name_func`` for PgBouncer: the unnamed statement, every time."""
    return ""


#: The first asyncpg that streams a server-side cursor of a type needing
#: introspection (an enum) with its statement cache off (asyncpg#1335).
ASYNCPG_FOR_PGBOUNCER: Final = (0, 32)


def asyncpg_version() -> tuple[int, int]:
    from importlib.metadata import version

    major, minor, *_ = [*version("asyncpg").split("."), "0"]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def pgbouncer_connect_args(connect_args: Mapping[str, Any], url: URL, name: str) -> dict[str, Any]:
    """``connect_args`` with the PgBouncer settings added; refuses ones that break them."""
    if asyncpg_version() < ASYNCPG_FOR_PGBOUNCER:
        raise ConfigurationError(
            "pooler",
            "pgbouncer",
            f"None with asyncpg < 0.32 (pool {name!r}): with the statement cache off, "
            "asyncpg 0.31 and older fail to stream a server-side cursor of an enum "
            "(asyncpg#1335); upgrade asyncpg to 0.32 or later",
        )
    given = dict(connect_args)
    for key in _MUST_BE_ZERO:
        for source, value in (
            (f"connect_args[{key!r}]", given.get(key)),
            (key, url.query.get(key)),
        ):
            if value is not None and str(value).strip() != "0":
                raise ConfigurationError(
                    f"{source} of pool {name!r} with pooler='pgbouncer'", value, f"0 ({_WHY})"
                )
    name_func = given.get("prepared_statement_name_func")
    if name_func is not None and name_func is not unnamed_statement:
        raise ConfigurationError(
            f"connect_args['prepared_statement_name_func'] of pool {name!r} with "
            "pooler='pgbouncer'",
            getattr(name_func, "__name__", type(name_func).__name__),
            "left unset: named statements, even uniquely named ones, break in autocommit "
            "behind PgBouncer (asyncpg's Close+Sync between prepare and execute lets "
            "the pooler switch server connections); pooler='pgbouncer' prepares them unnamed",
        )
    given["statement_cache_size"] = 0
    given["prepared_statement_cache_size"] = 0
    given["prepared_statement_name_func"] = unnamed_statement
    return given
