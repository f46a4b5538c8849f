"""asyncpool: a fair, observable, lifespan-bound pool for SQLAlchemy asyncio on asyncpg."""

from __future__ import annotations

from . import runner as runner
from . import telemetry as telemetry
from .budget import ConnectionBudget as ConnectionBudget
from .budget import connection_budget as connection_budget
from .config import PoolConfig as PoolConfig
from .engine import create_pooled_engine as create_pooled_engine
from .errors import AsyncPoolError as AsyncPoolError
from .errors import BudgetExceededError as BudgetExceededError
from .errors import ConcurrentUseError as ConcurrentUseError
from .errors import ConfigurationError as ConfigurationError
from .errors import DatabaseUnavailableError as DatabaseUnavailableError
from .errors import PoolClosedError as PoolClosedError
from .errors import PoolOverloadedError as PoolOverloadedError
from .errors import PoolTimeoutError as PoolTimeoutError
from .errors import WrongEventLoopError as WrongEventLoopError
from .fork import register_engine as register_engine
from .lifespan import pool_lifespan as pool_lifespan
from .maintenance import check_idle as check_idle
from .maintenance import resize as resize
from .retry import retry as retry
from .routing import EngineGroup as EngineGroup
from .routing import RoutingStatistics as RoutingStatistics
from .routing import create_analytics_engine as create_analytics_engine
from .runner import run as run
from .stats import PoolStatistics as PoolStatistics
from .stats import statistics as statistics

__version__ = "0.1.0"

__all__ = [
    "AsyncPoolError",
    "BudgetExceededError",
    "ConcurrentUseError",
    "ConfigurationError",
    "ConnectionBudget",
    "DatabaseUnavailableError",
    "EngineGroup",
    "PoolClosedError",
    "PoolConfig",
    "PoolOverloadedError",
    "PoolStatistics",
    "PoolTimeoutError",
    "RoutingStatistics",
    "WrongEventLoopError",
    "__version__",
    "check_idle",
    "connection_budget",
    "create_analytics_engine",
    "create_pooled_engine",
    "pool_lifespan",
    "register_engine",
    "resize",
    "retry",
    "run",
    "runner",
    "statistics",
    "telemetry",
]
