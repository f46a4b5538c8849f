"""The app test_app_process.py runs under ``gunicorn --preload`` with uvicorn workers.

At import (in the gunicorn master, before the fork) it uses the engine on an
event loop that stays open, so the master holds a live connection when the
workers are forked: what a ``--preload`` app with a start-up check does. Each
worker, once its lifespan has warmed its own pool, writes a report to
``$REPORT_DIR/<pid>.json``: its backend pids and the master's.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import asyncpool
from asyncpool.starlette import create_lifespan, health_endpoint

engine = asyncpool.create_pooled_engine(
    os.environ["DATABASE_URL"], asyncpool.PoolConfig.from_env(pool_size=2, max_overflow=0)
)


async def backend_pids(count: int) -> list[int]:
    """Backend pids of ``count`` connections held at once."""
    held = [await engine.connect() for _ in range(count)]
    try:
        return [int((await c.execute(text("SELECT pg_backend_pid()"))).scalar_one()) for c in held]
    finally:
        for conn in held:
            await conn.close()


# The master's own use of the engine, on a loop that is never closed.
MASTER_LOOP = asyncio.new_event_loop()
MASTER_BACKEND_PID = MASTER_LOOP.run_until_complete(backend_pids(1))[0]


@asynccontextmanager
async def report(app: Any) -> AsyncIterator[None]:
    pids = await backend_pids(2)
    path = Path(os.environ["REPORT_DIR"]) / f"{os.getpid()}.json"
    path.with_suffix(".tmp").write_text(
        json.dumps({"worker": os.getpid(), "backends": pids, "master": MASTER_BACKEND_PID})
    )
    path.with_suffix(".tmp").rename(path)
    yield


async def pid(request: Request) -> JSONResponse:
    return JSONResponse({"worker": os.getpid(), "backend": (await backend_pids(1))[0]})


app = Starlette(
    routes=[Route("/pid", pid), Route("/health", health_endpoint(engine))],
    lifespan=create_lifespan(engine, lifespan=report),
)
