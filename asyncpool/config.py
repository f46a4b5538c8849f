"""PoolConfig: validated pool settings with production defaults.

Every setting is checked when the config is built, so a bad value fails at
start-up with a message naming the setting and its valid range, never later
as a hang or a leaked connection. ``PoolConfig.from_env()`` reads the same
settings from ``ASYNCPOOL_*`` variables with the same checks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ._validate import check_bool, check_fraction, check_int, check_name, check_seconds
from .errors import ConfigurationError

__all__ = ["OTHER_VARIABLES", "PoolConfig"]

#: PostgreSQL takes ``client_connection_check_interval`` in milliseconds, up to INT_MAX.
_CHECK_INTERVAL_MAX: Final = 2_147_483.0

#: The most connections ``pool_size`` and ``max_overflow`` may each ask for.
POOL_SIZE_MAX: Final = 10_000
MAX_OVERFLOW_MAX: Final = 10_000

#: The largest share of ``pool_recycle`` that ``recycle_jitter`` may take off.
RECYCLE_JITTER_MAX: Final = 0.5

#: The most event loops ``max_loops`` may allow.
MAX_LOOPS_MAX: Final = 1024

#: The longest queue ``max_waiting`` may allow.
MAX_WAITING_MAX: Final = 1_000_000

#: Every ``ASYNCPOOL_*`` variable asyncpool reads that is not a pool setting,
#: and who reads it (the README's table). ``from_env()`` skips these; any other
#: unknown name under the prefix is an error, so a typo cannot pass silently.
OTHER_VARIABLES: Final[dict[str, str]] = {
    "ASYNCPOOL_PROCESSES": (
        "processes in the fleet for the connection budget (pool_lifespan, "
        "connection_budget; else WEB_CONCURRENCY, else 1)"
    ),
    "ASYNCPOOL_OTEL_BOUND_HISTOGRAMS": (
        "0 turns off the telemetry fast path for the wait and use histograms"
    ),
    "ASYNCPOOL_TEST_DSN": "the test suite's PostgreSQL (else an embedded one)",
    "ASYNCPOOL_TEST_DRIVER": "the test suite's driver: asyncpg (default) or psycopg",
}
_NOT_SETTINGS: Final = frozenset(name.removeprefix("ASYNCPOOL_") for name in OTHER_VARIABLES)

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_NONE: Final = frozenset({"", "none", "null"})

#: Poolers ``PoolConfig.pooler`` knows how to work behind.
POOLERS: Final = ("pgbouncer",)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Settings of one pool. Durations are float seconds.

    The defaults are meant for a production web service: pre-ping on (but
    skipped for connections returned in the last half second), connections
    recycled every 30 minutes, a 10 s bound on waiting for a connection and
    on connecting.
    """

    #: Name of the pool in logs, errors, metrics and ``statistics()``;
    #: ``None`` picks ``pool-N``.
    name: str | None = None
    #: Connections kept open in the pool (1 to 10000).
    pool_size: int = 10
    #: Extra connections opened under load and closed when returned (0 to 10000).
    max_overflow: int = 10
    #: Seconds a checkout waits for a connection before ``PoolTimeoutError``.
    pool_timeout: float = 10.0
    #: Seconds after which a connection is replaced at checkout; ``None`` never.
    pool_recycle: float | None = 1800.0
    #: Check a connection with a cheap round trip before handing it out.
    pre_ping: bool = True
    #: Seconds a pre-ping may take before the connection is deemed dead.
    pre_ping_timeout: float = 5.0
    #: Skip the pre-ping for connections returned less than this many seconds
    #: ago (HikariCP's alive-bypass window); 0 pings every checkout.
    pre_ping_skip_window: float = 0.5
    #: Refuse a checkout at once when this many callers already wait; 0 = no limit.
    max_waiting: int = 0
    #: Hand out the most recently returned connection first (lets idle ones age out).
    use_lifo: bool = False
    #: Seconds to establish a new connection (asyncpg ``timeout``).
    connect_timeout: float = 10.0
    #: Default per-statement timeout in seconds (asyncpg ``command_timeout``); ``None`` off.
    command_timeout: float | None = None
    #: Warn when a connection is held longer than this many seconds; ``None`` off.
    leak_threshold: float | None = None
    #: ``application_name`` reported to PostgreSQL; ``None`` uses the pool name.
    application_name: str | None = None
    #: Connections kept open by the pool's maintenance task (opened at start,
    #: refilled after an outage, with backoff); ``None`` opens on demand and
    #: warms ``pool_size`` at start-up (``pool_lifespan``).
    min_idle: int | None = None
    #: Seconds a connection above the floor (``min_idle``, else ``pool_size``)
    #: may stay unused before it is closed; overflow connections linger this
    #: long instead of closing when returned. ``None``: overflow connections
    #: close at once, as SQLAlchemy's pool does.
    idle_timeout: float | None = 10.0
    #: Each connection's lifetime is ``pool_recycle`` minus up to this share
    #: of it (0 to 0.5), spread so that connections opened together are not
    #: replaced together.
    recycle_jitter: float = 0.25
    #: Seconds after which an unused idle connection is pinged in the
    #: background and replaced if dead; ``None`` off.
    keepalive_interval: float | None = 120.0
    #: What sits between the pool and PostgreSQL: ``None`` (nothing) or
    #: ``"pgbouncer"`` (transaction pooling: prepared statements made safe).
    pooler: str | None = None
    #: Seconds the pool may spend putting an unclear connection in order (cancel
    #: its statement on the server, roll back) before it aborts it instead.
    cleanup_timeout: float = 5.0
    #: PostgreSQL's ``client_connection_check_interval`` (seconds) on every
    #: connection: a backend whose client vanished stops its statement within
    #: it. PostgreSQL 14+; never set behind a pooler; ``None`` leaves the
    #: server's own setting.
    client_connection_check_interval: float | None = 1.0
    #: Raise ``ConcurrentUseError`` when a second task uses a session that
    #: another task is connecting (``gather`` over one new ``AsyncSession``).
    #: Costs about 4% of a session statement's CPU; ``None`` turns it on in
    #: asyncio's debug mode (``PYTHONASYNCIODEBUG=1``, ``python -X dev``).
    #: Collisions the driver refuses (a commit racing a statement) are named
    #: the same way whatever this says: that costs nothing.
    detect_concurrent_use: bool | None = None
    #: Give each live event loop its own pool with these settings, instead of
    #: ``WrongEventLoopError`` (threads each running a loop on one engine).
    pool_per_loop: bool = False
    #: With ``pool_per_loop``: the most loops served at once (1 to 1024); the
    #: connection budget counts this many pools per engine.
    max_loops: int = 8

    def __post_init__(self) -> None:
        check_name("name", self.name, optional=True)
        check_int("pool_size", self.pool_size, low=1, high=POOL_SIZE_MAX)
        check_int("max_overflow", self.max_overflow, low=0, high=MAX_OVERFLOW_MAX)
        check_seconds("pool_timeout", self.pool_timeout, allow_zero=False)
        check_seconds("pool_recycle", self.pool_recycle, allow_zero=False, optional=True)
        check_bool("pre_ping", self.pre_ping)
        check_seconds("pre_ping_timeout", self.pre_ping_timeout, allow_zero=False)
        check_seconds("pre_ping_skip_window", self.pre_ping_skip_window, allow_zero=True)
        check_int("max_waiting", self.max_waiting, low=0, high=MAX_WAITING_MAX)
        check_bool("use_lifo", self.use_lifo)
        check_seconds("connect_timeout", self.connect_timeout, allow_zero=False)
        check_seconds("command_timeout", self.command_timeout, allow_zero=False, optional=True)
        check_seconds("leak_threshold", self.leak_threshold, allow_zero=False, optional=True)
        check_name("application_name", self.application_name, optional=True)
        if self.min_idle is not None:
            check_int("min_idle", self.min_idle, low=0, high=self.pool_size, high_name="pool_size")
        check_seconds("idle_timeout", self.idle_timeout, allow_zero=False, optional=True)
        check_fraction("recycle_jitter", self.recycle_jitter, high=RECYCLE_JITTER_MAX)
        check_seconds(
            "keepalive_interval", self.keepalive_interval, allow_zero=False, optional=True
        )
        check_seconds("cleanup_timeout", self.cleanup_timeout, allow_zero=False)
        check_seconds(
            "client_connection_check_interval",
            self.client_connection_check_interval,
            allow_zero=False,
            optional=True,
            low=0.001,
            high=_CHECK_INTERVAL_MAX,
        )
        check_bool("pool_per_loop", self.pool_per_loop)
        check_int("max_loops", self.max_loops, low=1, high=MAX_LOOPS_MAX)
        if self.detect_concurrent_use is not None:
            check_bool("detect_concurrent_use", self.detect_concurrent_use)
        if self.pooler is not None and self.pooler not in POOLERS:
            raise ConfigurationError("pooler", self.pooler, f"None or one of {', '.join(POOLERS)}")

    @property
    def max_size(self) -> int:
        """The most connections this pool can hold open at once (per loop with
        ``pool_per_loop``)."""
        return self.pool_size + self.max_overflow

    @property
    def loops(self) -> int:
        """Pools an engine may hold: ``max_loops`` with ``pool_per_loop``, else 1."""
        return self.max_loops if self.pool_per_loop else 1

    @property
    def effective_min_idle(self) -> int:
        """Connections to open when warming: ``min_idle``, else ``pool_size``."""
        return self.pool_size if self.min_idle is None else self.min_idle

    @property
    def idle_capacity(self) -> int | None:
        """The most idle connections kept: ``pool_size`` without ``idle_timeout``
        (overflow ones close when returned), else every slot (``None``: no limit)."""
        if self.idle_timeout is None:
            return self.pool_size
        return None if self.max_overflow < 0 else self.max_size

    def replace(self, **changes: Any) -> PoolConfig:
        """A copy with some settings changed, validated like the original."""
        unknown = sorted(set(changes) - set(setting_names()))
        if unknown:
            raise ConfigurationError(
                unknown[0], changes[unknown[0]], f"one of the settings {', '.join(setting_names())}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls,
        prefix: str = "ASYNCPOOL_",
        *,
        environ: Mapping[str, str] | None = None,
        **defaults: Any,
    ) -> PoolConfig:
        """Build a config from environment variables (12-factor style).

        ``ASYNCPOOL_POOL_SIZE=20`` sets ``pool_size``; ``none`` (or an empty
        value) turns an optional setting off; booleans accept
        1/0, true/false, yes/no, on/off. The prefix's variables that are not
        pool settings (``OTHER_VARIABLES``: ``ASYNCPOOL_PROCESSES``, ...) are
        skipped; any other name under the prefix is an error, so a typo cannot
        pass silently.
        ``defaults`` are used for settings the environment does not give.
        """
        env = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = dict(defaults)
        for key, raw in env.items():
            if not key.startswith(prefix):
                continue
            suffix = key[len(prefix) :]
            if suffix in _NOT_SETTINGS:
                continue
            name = suffix.lower()
            if name not in fields:
                raise ConfigurationError(
                    key, raw, f"a setting, one of {', '.join(prefix + n.upper() for n in fields)}"
                )
            values[name] = _parse_env(key, raw, _FIELD_KINDS[name])
        return cls(**values)


def setting_names() -> tuple[str, ...]:
    """Names of every ``PoolConfig`` setting, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(PoolConfig))


# What each setting parses as from a string: (kind, optional).
_FIELD_KINDS: Final[dict[str, tuple[str, bool]]] = {
    "name": ("str", True),
    "pool_size": ("int", False),
    "max_overflow": ("int", False),
    "pool_timeout": ("float", False),
    "pool_recycle": ("float", True),
    "pre_ping": ("bool", False),
    "pre_ping_timeout": ("float", False),
    "pre_ping_skip_window": ("float", False),
    "max_waiting": ("int", False),
    "use_lifo": ("bool", False),
    "connect_timeout": ("float", False),
    "command_timeout": ("float", True),
    "leak_threshold": ("float", True),
    "application_name": ("str", True),
    "min_idle": ("int", True),
    "idle_timeout": ("float", True),
    "recycle_jitter": ("float", False),
    "keepalive_interval": ("float", True),
    "pooler": ("str", True),
    "cleanup_timeout": ("float", False),
    "client_connection_check_interval": ("float", True),
    "detect_concurrent_use": ("bool", True),
    "pool_per_loop": ("bool", False),
    "max_loops": ("int", False),
}


def _parse_env(key: str, raw: str, kind: tuple[str, bool]) -> Any:
    type_name, optional = kind
    text = raw.strip()
    if optional and text.lower() in _NONE:
        return None
    if type_name == "str":
        return text
    if type_name == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigurationError(key, raw, "a boolean (1/0, true/false, yes/no, on/off)")
    try:
        return int(text) if type_name == "int" else float(text)
    except ValueError:
        expected = "an integer" if type_name == "int" else "a number of seconds"
        if optional:
            expected += " or 'none'"
        raise ConfigurationError(key, raw, expected) from None
