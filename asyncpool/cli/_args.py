"""Flags for every ``PoolConfig`` setting, generated from the dataclass itself.

The flags cannot drift from the settings: each field becomes ``--field-name``
with the field's type, and its value is parsed exactly like the field's
``ASYNCPOOL_*`` variable. The environment is the base, flags override it, and
a bad value is reported under the name the user typed (``--pool-size`` or
``ASYNCPOOL_POOL_SIZE``), never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from ..config import PoolConfig, _parse_env
from ..errors import ConfigurationError

__all__ = [
    "ArgumentParser",
    "Setting",
    "UsageError",
    "add_pool_flags",
    "config_from_args",
    "describe",
    "non_negative",
    "parse_config_spec",
    "pool_settings",
    "positive",
    "range_text",
    "within",
]

#: Where the flags of the pool settings keep their values in the namespace.
_DEST_PREFIX: Final = "pool_setting__"

#: Shorthand for the two or three sizes people quote: ``5/0``, ``10/20/30``.
_SHORTHAND: Final = ("pool_size", "max_overflow", "pool_timeout")

_KINDS: Final[dict[type, str]] = {int: "int", float: "float", bool: "bool", str: "str"}


class UsageError(Exception):
    """A flag, variable or value the command cannot use; the message names it."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a "did you mean" hint when a flag is misspelt.

    Flags a subcommand does not know are reported by that subcommand's
    parser (its usage, its flags to suggest from), not by the top level.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args)
        if extras:
            owner = self.commands.get(getattr(parsed, "command", None) or "", self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        match = re.match(r"unrecognized arguments: (\S+)", message)
        if match:
            typed = match.group(1).split("=", 1)[0]
            known = [s for action in self._actions for s in action.option_strings]
            close = difflib.get_close_matches(typed, known, n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        super().error(message)


@dataclass(frozen=True, slots=True)
class Setting:
    """One ``PoolConfig`` field as the command line and the environment see it."""

    name: str
    kind: str  # "int", "float", "bool" or "str"
    optional: bool  # None allowed (given as "none")
    default: Any
    doc: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def variable(self) -> str:
        return "ASYNCPOOL_" + self.name.upper()

    @property
    def dest(self) -> str:
        return _DEST_PREFIX + self.name

    def parse(self, raw: str, *, source: str | None = None) -> Any:
        """Parse text as the ``ASYNCPOOL_*`` variable would be parsed."""
        return _parse_env(source or self.flag, raw, (self.kind, self.optional))


def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    """An argparse ``type=``: a finite number > 0 of ``kind``."""
    return _number(kind, lambda value: value > 0, "> 0")


def non_negative(kind: type[int] | type[float]) -> Callable[[str], Any]:
    """An argparse ``type=``: a finite number >= 0 of ``kind``."""
    return _number(kind, lambda value: value >= 0, ">= 0")


def within(
    kind: type[int] | type[float], low: float, high: float, *, low_excluded: bool = False
) -> Callable[[str], Any]:
    """An argparse ``type=``: a number of ``kind`` from ``low`` to ``high``."""

    def ok(value: float) -> bool:
        return (value > low if low_excluded else value >= low) and value <= high

    return _number(kind, ok, range_text(kind, low, high, low_excluded=low_excluded), noun=False)


def range_text(
    kind: type[int] | type[float], low: float, high: float, *, low_excluded: bool = False
) -> str:
    """``an integer from 1 to 100000``, ``a number > 0 and <= 10000000``."""
    if kind is int:
        return f"an integer from {low:.15g} to {high:.15g}"
    if low_excluded:
        return f"a number > {low:.15g} and <= {high:.15g}"
    return f"a number from {low:.15g} to {high:.15g}"


def _number(
    kind: type[int] | type[float], ok: Callable[[float], bool], bound: str, *, noun: bool = True
) -> Callable[[str], Any]:
    name = "an integer" if kind is int else "a number"
    expected = f"{name} {bound}" if noun else bound

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def pool_settings() -> tuple[Setting, ...]:
    """Every ``PoolConfig`` field, in declaration order, with its type and comment."""
    hints = typing.get_type_hints(PoolConfig)
    docs = _field_docs()
    result = []
    for field in dataclasses.fields(PoolConfig):
        kind, optional = _kind_of(field.name, hints[field.name])
        result.append(Setting(field.name, kind, optional, field.default, docs.get(field.name, "")))
    return tuple(result)


def _kind_of(name: str, hint: Any) -> tuple[str, bool]:
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
    if hint not in _KINDS:
        raise TypeError(f"PoolConfig.{name}: no command-line form for type {hint!r}")
    return _KINDS[hint], optional


def _field_docs() -> dict[str, str]:
    """The ``#:`` comment above each field: the same words as the source, no copy to drift."""
    try:
        source = inspect.getsource(PoolConfig)
    except (OSError, TypeError):  # pragma: no cover - frozen or source-less installs
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        field = re.match(r"(\w+)\s*:", stripped)
        if field and pending:
            text = " ".join(pending).replace("``None``", "none")
            docs[field.group(1)] = text.replace("``", "")
        pending = []
    return docs


def add_pool_flags(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """Add ``--pool-size`` and the rest: one flag per ``PoolConfig`` field.

    ``defaults`` are this command's own defaults for some settings (the
    simulation's short ``pool_timeout``); the environment overrides them and
    flags override the environment.
    """
    group = parser.add_argument_group(
        "pool settings",
        "Every PoolConfig setting. Defaults come from ASYNCPOOL_* variables, else\n"
        "PoolConfig; flags override them. Optional settings take 'none' to turn off.",
    )
    for setting in pool_settings():
        default = defaults.get(setting.name, setting.default)
        note = f"[{setting.variable}; default {_show(default)}]"
        help_text = f"{setting.doc} {note}".strip().replace("%", "%%")
        if setting.kind == "bool" and not setting.optional:
            group.add_argument(
                setting.flag,
                dest=setting.dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        group.add_argument(
            setting.flag,
            dest=setting.dest,
            type=_flag_type(setting),
            default=argparse.SUPPRESS,
            metavar=setting.kind.upper()
            if not setting.optional
            else f"{setting.kind.upper()}|none",
            help=help_text,
        )


def _flag_type(setting: Setting) -> Any:
    def parse(raw: str) -> Any:
        try:
            return setting.parse(raw)
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(f"expected {exc.expected}, got {raw!r}") from None

    parse.__name__ = setting.kind  # argparse names the type in some messages
    return parse


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_from_args(args: argparse.Namespace, defaults: Mapping[str, Any]) -> PoolConfig:
    """``PoolConfig.from_env(**defaults)`` with the flags given on top, checked as one.

    Raises ``UsageError`` naming the flag or the variable at fault.
    """
    try:
        base = PoolConfig.from_env(**defaults)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    given = {s.name: getattr(args, s.dest) for s in pool_settings() if hasattr(args, s.dest)}
    return _replace(base, given, source=lambda name: "argument " + _flag_of(name))


def parse_config_spec(text: str, base: PoolConfig) -> tuple[str, PoolConfig]:
    """A ``--compare`` configuration: ``5/0``, ``10/20/30`` or ``pool_size=5,max_overflow=0``.

    Returns a short label and ``base`` with those settings replaced.
    """
    by_name = {s.name: s for s in pool_settings()}
    where = f"argument --compare {text!r}"
    changes: dict[str, Any] = {}
    if "=" not in text:
        parts = [p.strip() for p in text.split("/")]
        if not 1 <= len(parts) <= len(_SHORTHAND) or not all(parts):
            raise UsageError(
                f"{where}: expected POOL_SIZE/MAX_OVERFLOW[/POOL_TIMEOUT] such as 5/0 or "
                "10/20/30, or settings such as pool_size=5,max_overflow=0"
            )
        pairs = list(zip(_SHORTHAND, parts, strict=False))
    else:
        pairs = []
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, raw = item.partition("=")
            name = key.strip().lstrip("-").replace("-", "_").lower()
            if not sep or name not in by_name:
                close = difflib.get_close_matches(name, list(by_name), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UsageError(f"{where}: {key.strip()!r} is not a pool setting{hint}")
            pairs.append((name, raw.strip()))
    for name, raw in pairs:
        try:
            changes[name] = by_name[name].parse(raw, source=name)
        except ConfigurationError as exc:
            raise UsageError(f"{where}: {exc}") from None
    config = _replace(base, changes, source=lambda name: f"{where}: {name}")
    return _label(changes), config


def _label(changes: Mapping[str, Any]) -> str:
    sizes = [changes[n] for n in _SHORTHAND if n in changes]
    if len(sizes) == len(changes) and list(changes) == list(_SHORTHAND[: len(sizes)]):
        return "/".join(_show(v) for v in sizes)
    return ",".join(f"{k}={_show(v)}" for k, v in changes.items())


def _replace(base: PoolConfig, changes: Mapping[str, Any], *, source: Any) -> PoolConfig:
    try:
        return base.replace(**changes)
    except ConfigurationError as exc:
        if exc.setting in changes:
            message = f"{source(exc.setting)}: must be {exc.expected}, got {exc.value!r}"
            raise UsageError(message) from None
        # A cross-field rule (min_idle <= pool_size) tripped over a value from
        # the environment or a default: name the setting as the config does.
        raise UsageError(str(exc)) from None


def _flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def describe(config: PoolConfig, keys: Sequence[str] = _SHORTHAND) -> str:
    """``pool_size=5, max_overflow=0, pool_timeout=3`` for headers and tables."""
    return ", ".join(f"{k}={_show(getattr(config, k))}" for k in keys)
