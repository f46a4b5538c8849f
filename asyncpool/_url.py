"""Database URLs: one redaction for everything printed, and libpq parameters translated.

**Redaction.** ``redact_url()`` masks the password of the user-info and
every secret-bearing query parameter (``password``, ``sslpassword``, and any
name holding ``password``, ``secret`` or ``token``); ``scrub()`` removes the
secrets of given URLs (raw and percent-encoded) and anything shaped like a
URL password or a ``password=`` pair from free text such as a driver's error.

**Translation.** Cloud consoles hand out libpq URLs
(``?sslmode=require&connect_timeout=5``); SQLAlchemy's asyncpg dialect passes
query parameters to ``asyncpg.connect()`` as keyword arguments, which refuses
most of them with a bare ``TypeError`` at the first connect.
``translate_query()`` turns the ones users bring into what asyncpg takes and
refuses every other one, when the engine is created:

======================== =====================================================
URL parameter            becomes
======================== =====================================================
``user``, ``password``,  the URL's user name, password, database (so the
``dbname``               password is masked like any other)
``sslmode`` (6 values;   asyncpg's own libpq-compatible TLS set-up (its ``dsn``
or ``ssl``),
``sslrootcert``,         parser: ``prefer``/``allow`` fallback, CA and client
``sslcert``, ``sslkey``, files, key password, CRL), files checked to exist now
``sslpassword``,
``sslcrl``
``connect_timeout``,     ``PoolConfig.connect_timeout`` (asyncpg ``timeout``)
``timeout``
``command_timeout``      ``PoolConfig.command_timeout``
``application_name``     ``PoolConfig.application_name``
``options``              the ``options`` startup parameter (``-c name=value``)
``target_session_attrs`` asyncpg ``target_session_attrs``
``statement_cache_size``, asyncpg's, as integers
``max_cached_statement_lifetime``,
``max_cacheable_statement_size``
``host``, ``port``,      left to SQLAlchemy's dialect (several hosts, socket
``prepared_statement_    directory; its statement cache)
cache_size``
======================== =====================================================
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote, quote_plus, urlencode

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError

__all__ = [
    "SSLMODES",
    "TARGET_SESSION_ATTRS",
    "UrlOptions",
    "redact_url",
    "scrub",
    "secrets_of",
    "translate_query",
]

MASK: Final = "***"
UNPARSEABLE: Final = "<unparseable URL>"

#: Query parameter names that always carry a secret.
_SECRET_NAMES: Final = frozenset({"password", "sslpassword", "passphrase"})
#: ... and words that make any parameter name secret-bearing.
_SECRET_WORDS: Final = ("password", "secret", "token", "passphrase", "credential")

SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
TARGET_SESSION_ATTRS: Final = (
    "any",
    "primary",
    "standby",
    "prefer-standby",
    "read-write",
    "read-only",
)
_SSL_FILES: Final = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
_SSL_PARAMETERS: Final = ("sslmode", *_SSL_FILES, "sslpassword")
#: asyncpg's own name for ``sslmode``, common in SQLAlchemy URLs (``?ssl=require``).
_SSL_ALIAS: Final = "ssl"
_IDENTITY: Final = {"user": "username", "password": "password", "dbname": "database"}
_TIMEOUTS: Final = ("connect_timeout", "timeout", "command_timeout")
_DRIVER_INTEGERS: Final = (
    "statement_cache_size",
    "max_cached_statement_lifetime",
    "max_cacheable_statement_size",
)
#: Read by SQLAlchemy's asyncpg dialect itself: left in the URL.
_DIALECT_PARAMETERS: Final = ("host", "port", "prepared_statement_cache_size")

SUPPORTED_PARAMETERS: Final = (
    *_IDENTITY,
    *_SSL_PARAMETERS,
    _SSL_ALIAS,
    *_TIMEOUTS,
    "application_name",
    "options",
    "target_session_attrs",
    *_DRIVER_INTEGERS,
    *_DIALECT_PARAMETERS,
)

#: For psycopg: libpq's names only (asyncpg's statement-cache ones do not apply).
PSYCOPG_PARAMETERS: Final = tuple(
    p for p in SUPPORTED_PARAMETERS if p not in (*_DRIVER_INTEGERS, "prepared_statement_cache_size")
)


def is_secret_parameter(name: str) -> bool:
    """Whether a URL query parameter of this name carries a secret."""
    lowered = name.lower()
    return lowered in _SECRET_NAMES or any(word in lowered for word in _SECRET_WORDS)


def redact_url(url: str | URL) -> str:
    """The URL as text with the password and every secret parameter masked.

    Safe for logs and errors, whatever form the URL takes; text that is not
    a URL at all comes back as ``<unparseable URL>``.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError, AttributeError):
        return UNPARSEABLE
    query = {
        key: (MASK if is_secret_parameter(key) else value) for key, value in parsed.query.items()
    }
    shown = parsed.set(query=query).render_as_string(hide_password=True)
    return shown.replace(quote(MASK, safe=""), MASK)


def secrets_of(url: str | URL | None) -> tuple[str, ...]:
    """The secrets a URL carries: its password and every secret query value."""
    if url is None:
        return ()
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError, AttributeError):
        return ()
    found: list[str] = []
    if parsed.password:
        found.append(str(parsed.password))
    for key, value in parsed.query.items():
        if is_secret_parameter(key):
            found.extend([value] if isinstance(value, str) else list(value))
    return tuple(secret for secret in found if secret)


#: ``scheme://user:password@`` in free text.
_USERINFO: Final = re.compile(r"(://[^\s:/?#@]*:)[^\s@/]*@")
#: ``password=...`` as a URL query pair or a libpq keyword/value pair.
_PAIR: Final = re.compile(
    r"(?i)\b([a-z_]*(?:password|secret|token|passphrase)[a-z_]*\s*=\s*)('[^']*'|[^\s&'\"]+)"
)


def scrub(text: str, urls: Iterable[str | URL | None] = (), secrets: Iterable[str] = ()) -> str:
    """``text`` without the secrets of ``urls`` (raw and percent-encoded), without
    ``secrets``, and without anything shaped like a URL password or a
    ``password=`` pair."""
    every = [*secrets]
    for url in urls:
        every.extend(secrets_of(url))
    for secret in sorted({s for s in every if s}, key=len, reverse=True):
        for form in {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}:
            text = text.replace(form, MASK)
    text = _USERINFO.sub(rf"\g<1>{MASK}@", text)
    return _PAIR.sub(rf"\g<1>{MASK}", text)


@dataclass(frozen=True, slots=True)
class UrlOptions:
    """What the URL's query asked for, in the terms asyncpool and asyncpg use."""

    #: Keyword arguments for ``asyncpg.connect()``.
    connect_args: dict[str, Any] = field(default_factory=dict)
    #: Startup parameters (``options``).
    server_settings: dict[str, str] = field(default_factory=dict)
    #: ``PoolConfig`` settings given in the URL (connect_timeout, ...).
    settings: dict[str, Any] = field(default_factory=dict)


def translate_query(url: URL, driver: str = "asyncpg") -> tuple[URL, UrlOptions]:
    """The URL without the parameters asyncpool translates, and what they became.

    Raises ``ConfigurationError`` naming the parameter for one the driver
    would refuse or misread, or whose value is out of range. psycopg takes
    libpq's parameters as they are (TLS files, ``target_session_attrs``);
    asyncpg's statement-cache parameters are refused for it.
    """
    query = dict(url.query)
    supported = SUPPORTED_PARAMETERS if driver == "asyncpg" else PSYCOPG_PARAMETERS
    unknown = sorted(set(query) - set(supported))
    if unknown:
        name = unknown[0]
        raise ConfigurationError(
            f"URL parameter {name!r}",
            MASK if is_secret_parameter(name) else query[name],
            f"one asyncpool translates for {driver}: " + ", ".join(supported),
        )
    values: dict[str, str] = {}
    for key, value in query.items():
        if key in _DIALECT_PARAMETERS:
            continue
        if not isinstance(value, str):
            raise ConfigurationError(
                f"URL parameter {key!r}",
                MASK if is_secret_parameter(key) else list(value),
                "given once",
            )
        values[key] = value
    options = UrlOptions()
    changes: dict[str, Any] = {}
    for key, attribute in _IDENTITY.items():
        if key not in values:
            continue
        value = values.pop(key)
        current = getattr(url, attribute)
        if current is not None and current != value:
            raise ConfigurationError(
                f"URL parameter {key!r}",
                MASK if key == "password" else value,
                f"the same as the URL's {attribute} (given twice, differently)",
            )
        changes[attribute] = value
    _translate_ssl(values, options, native=driver != "asyncpg")
    _translate_timeouts(values, options)
    if "application_name" in values:
        options.settings["application_name"] = values.pop("application_name")
    if "options" in values:
        text = values.pop("options").strip()
        if not text:
            raise ConfigurationError(
                "URL parameter 'options'", text, "command-line options such as -c name=value"
            )
        options.server_settings["options"] = text
    if "target_session_attrs" in values:
        attrs = values.pop("target_session_attrs")
        if attrs not in TARGET_SESSION_ATTRS:
            raise ConfigurationError(
                "URL parameter 'target_session_attrs'",
                attrs,
                f"one of {', '.join(TARGET_SESSION_ATTRS)}",
            )
        options.connect_args["target_session_attrs"] = attrs
    for key in _DRIVER_INTEGERS:
        if key in values:
            options.connect_args[key] = _integer(key, values.pop(key))
    kept = {key: value for key, value in query.items() if key in _DIALECT_PARAMETERS}
    if "prepared_statement_cache_size" in kept:
        _integer("prepared_statement_cache_size", kept["prepared_statement_cache_size"])
    return url.set(query=kept, **changes), options


def _translate_ssl(values: dict[str, str], options: UrlOptions, *, native: bool) -> None:
    given: dict[str, str] = {key: values.pop(key) for key in _SSL_PARAMETERS if key in values}
    alias = values.pop(_SSL_ALIAS, None)
    if alias is not None:
        if given.get("sslmode", alias) != alias:
            raise ConfigurationError(
                "URL parameter 'ssl'", alias, "the same as sslmode when both are given"
            )
        given["sslmode"] = alias
    if not given:
        return
    mode = given.get("sslmode")
    if mode is not None and mode not in SSLMODES:
        name = "ssl" if alias is not None else "sslmode"
        raise ConfigurationError(f"URL parameter {name!r}", mode, f"one of {', '.join(SSLMODES)}")
    for key in _SSL_FILES:
        path = given.get(key)
        if path is not None and not os.path.isfile(os.path.expanduser(path)):
            raise ConfigurationError(f"URL parameter {key!r}", path, "a readable file")
    if native:
        options.connect_args.update(given)  # libpq's own parameters
        return
    if mode == "disable" and len(given) == 1:
        options.connect_args["ssl"] = False
        return
    # asyncpg implements libpq's sslmode (certificate files, the prefer/allow
    # fallback) in its DSN parser only: hand it a DSN holding just these; the
    # host, port and user that SQLAlchemy passes as arguments take precedence.
    options.connect_args["dsn"] = "postgresql://?" + urlencode(given)


def _translate_timeouts(values: dict[str, str], options: UrlOptions) -> None:
    connect = {key: values.pop(key) for key in ("connect_timeout", "timeout") if key in values}
    seconds = {key: _seconds(key, value) for key, value in connect.items()}
    if len(set(seconds.values())) > 1:
        raise ConfigurationError(
            "URL parameter 'timeout'",
            connect["timeout"],
            "equal to connect_timeout when both are given",
        )
    if seconds:
        options.settings["connect_timeout"] = next(iter(seconds.values()))
    if "command_timeout" in values:
        options.settings["command_timeout"] = _seconds(
            "command_timeout", values.pop("command_timeout")
        )


def _seconds(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"URL parameter {key!r}", raw, "a finite number of seconds > 0")
    return value


def _integer(key: str, raw: str | tuple[str, ...]) -> int:
    try:
        value = int(raw) if isinstance(raw, str) else -1
    except ValueError:
        value = -1
    if not 0 <= value <= 2**31 - 1:
        raise ConfigurationError(f"URL parameter {key!r}", raw, f"an integer from 0 to {2**31 - 1}")
    return value


def merge_settings(
    settings: Mapping[str, Any], configured: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``PoolConfig`` changes a URL asks for; a clash with a setting given
    explicitly (not at its default) is an error naming both."""
    changes: dict[str, Any] = {}
    for name, value in settings.items():
        current = configured[name]
        if current != defaults[name] and current != value:
            raise ConfigurationError(
                f"URL parameter {name!r}",
                value,
                f"the same as PoolConfig.{name}={current!r}, or given in one place only",
            )
        changes[name] = value
    return changes
