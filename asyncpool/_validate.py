"""Argument checks shared by ``PoolConfig`` and every public function.

Each check raises one ``ConfigurationError`` naming the argument, the value
given and the valid range, so a bad argument to ``pool_lifespan``,
``EngineGroup``, ``Sessions``, ``retry`` or ``connection_budget`` reads like a
bad ``PoolConfig`` setting; callers run them before anything else happens (no
connection opened, no engine created, no state changed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from .errors import ConfigurationError

__all__ = [
    "ENGINES_EXPECTED",
    "NAME_MAX",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_int",
    "check_mapping",
    "check_name",
    "check_seconds",
    "check_sequence",
]

#: PostgreSQL truncates application_name (and asyncpool's pool names) to
#: NAMEDATALEN - 1 bytes.
NAME_MAX: Final = 63

#: What ``pool_lifespan``, ``connection_budget`` and ``health_endpoint`` take as engines.
ENGINES_EXPECTED: Final = "an AsyncEngine or an object with an 'engines' attribute (an EngineGroup)"


def check_int(
    setting: str,
    value: object,
    *,
    low: int,
    high: int | None = None,
    high_name: str | None = None,
) -> None:
    """An ``int`` (not a ``bool``) from ``low`` to ``high`` (``None``: no upper bound)."""
    if high is None:
        expected = f"an integer >= {low}"
    else:
        upper = f"{high_name} ({high})" if high_name else str(high)
        expected = f"an integer from {low} to {upper}"
    ok = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )
    if not ok:
        raise ConfigurationError(setting, value, expected)


def check_seconds(
    setting: str,
    value: object,
    *,
    allow_zero: bool,
    optional: bool = False,
    low: float | None = None,
    high: float | None = None,
) -> None:
    """A finite number of seconds, > 0 (or >= 0 with ``allow_zero``), maybe ``None``."""
    if value is None and optional:
        return
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
        and (low is None or value >= low)
        and (high is None or value <= high)
    )
    if not ok:
        if low is not None and high is not None:
            expected = f"a number of seconds from {low:g} to {high:g}"
        else:
            expected = "a finite number of seconds " + (">= 0" if allow_zero else "> 0")
        if optional:
            expected += ", or None to turn it off"
        raise ConfigurationError(setting, value, expected)


def check_fraction(setting: str, value: object, *, high: float) -> None:
    """A number from 0 to ``high``."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= high
    )
    if not ok:
        raise ConfigurationError(setting, value, f"a number from 0 to {high:g}")


def check_bool(setting: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(setting, value, "True or False")


def check_name(setting: str, value: object, *, optional: bool, max_length: int = NAME_MAX) -> None:
    """Printable ASCII of 1 to ``max_length`` characters (a pool or application name)."""
    if value is None and optional:
        return
    ok = (
        isinstance(value, str)
        and 0 < len(value.encode()) <= max_length
        and value.isascii()
        and value.isprintable()
    )
    if not ok:
        expected = f"printable ASCII text of 1 to {max_length} characters"
        raise ConfigurationError(setting, value, expected)


def check_choice(setting: str, value: object, choices: Sequence[object]) -> None:
    """One of ``choices`` (compared with ``==``, a ``bool`` never passing for an ``int``)."""
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        ok = False
    else:
        try:
            ok = value in choices
        except TypeError:  # pragma: no cover - an object whose == raises
            ok = False
    if not ok:
        raise ConfigurationError(setting, value, "one of " + ", ".join(map(repr, choices)))


def check_mapping(setting: str, value: object, *, optional: bool = True) -> None:
    """A mapping with string keys (keyword options), or ``None`` when optional."""
    if value is None and optional:
        return
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        expected = "a mapping of option names to values" + (", or None" if optional else "")
        raise ConfigurationError(setting, type(value).__name__, expected)


def check_callable(setting: str, value: object, expected: str) -> None:
    if not callable(value):
        raise ConfigurationError(setting, _shown(value), expected)


def check_sequence(
    setting: str, value: object, item_ok: Callable[[object], bool], *, items: str, item: str
) -> tuple[Any, ...]:
    """A list or tuple (never a string, which is a sequence of letters) whose items pass.

    Returns it as a tuple; ``items`` and ``item`` describe what it holds
    (``database URLs``, ``a database URL``).
    Values are shown by their type only: a URL may hold a password.
    """
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigurationError(setting, type(value).__name__, f"a list or tuple of {items}")
    found = tuple(value)
    for index, each in enumerate(found):
        if not item_ok(each):
            raise ConfigurationError(f"{setting}[{index}]", type(each).__name__, item)
    return found


def _shown(value: object) -> object:
    """Numbers, text and ``None`` as themselves; other objects by their type name."""
    if value is None or isinstance(value, str | int | float):
        return value
    return type(value).__name__
