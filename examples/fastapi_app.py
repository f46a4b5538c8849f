"""A small FastAPI service on asyncpool: users, a streaming export, a readiness probe.

    uvicorn examples.fastapi_app:app                      # embedded PostgreSQL
    DATABASE_URL=postgresql://app:secret@db/app uvicorn examples.fastapi_app:app

- start-up: the pool is warm (``pool_size`` connections) and the ``users``
  table exists before the first request; an unreachable database stops the
  start-up with ``DatabaseUnavailableError`` instead of a half-alive app;
- ``POST /users``, ``GET /users/{id}``: one session per request, committed
  before the response is sent, rolled back on error;
- ``GET /users/export``: NDJSON, streamed after the request's connection is
  back in the pool;
- ``GET /health``: 200 + pool statistics ("ok", or "saturated" while every
  connection is busy), or 503 + reason (readiness probe; never queues);
- ``GET /metrics``: the pool's OpenTelemetry metrics for Prometheus
  (``asyncpool.telemetry.prometheus``; dashboard: ``examples/grafana_dashboard.json``);
- shutdown (SIGTERM): in-flight requests finish, then the pool drains and
  closes; nothing is left in ``pg_stat_activity``.

Pool settings come from ``ASYNCPOOL_*`` variables (``ASYNCPOOL_POOL_SIZE=20``).
To add a route, use ``app`` like any FastAPI app (``app.mount("/metrics", ...)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from sqlalchemy import String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.concurrency import run_in_threadpool

import asyncpool
from asyncpool.starlette import Sessions, create_lifespan, health_endpoint
from asyncpool.telemetry import instrument
from asyncpool.telemetry.prometheus import create_metric_reader, metrics_route


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200), unique=True)


class NewUser(BaseModel):
    name: str
    email: str


class UserOut(BaseModel):
    id: int
    name: str
    email: str


# ------------------------------------------------------------------ database

DATABASE_URL = os.environ.get("DATABASE_URL")
if DATABASE_URL is None:
    from asyncpool.embedded import free_port

    EMBEDDED_PORT: int | None = free_port()
    URL = f"postgresql+asyncpg://postgres@127.0.0.1:{EMBEDDED_PORT}/postgres"
else:
    EMBEDDED_PORT = None
    URL = DATABASE_URL

# Created at import, opened by the lifespan: no connection exists before start-up.
engine = asyncpool.create_pooled_engine(
    URL, asyncpool.PoolConfig.from_env(name="users-api", pool_size=5, max_overflow=5)
)
sessions = Sessions(engine)
DB = Annotated[AsyncSession, sessions.depends()]


@asynccontextmanager
async def embedded_postgres() -> AsyncIterator[None]:
    """Without DATABASE_URL: run a throwaway PostgreSQL for the app's lifetime."""
    if EMBEDDED_PORT is None:
        yield
        return
    from asyncpool.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(port=EMBEDDED_PORT)
    await run_in_threadpool(server.start)
    try:
        yield
    finally:
        await run_in_threadpool(server.cleanup)


@asynccontextmanager
async def create_tables(app: FastAPI) -> AsyncIterator[None]:
    """The app's own start-up: runs with the pool already warm."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield


pools = create_lifespan(engine, lifespan=create_tables)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    async with embedded_postgres(), pools(app) as state:
        yield state


app = FastAPI(title="users", lifespan=lifespan)
app.add_route("/health", health_endpoint(engine), include_in_schema=False)

# GET /metrics: a meter provider of the app's own, so importing the app sets
# nothing globally. (With an SDK installed globally, e.g. by
# opentelemetry-instrument, add create_metric_reader() to that provider instead.)
metrics_registry = CollectorRegistry()
meter_provider = MeterProvider(metric_readers=[create_metric_reader(metrics_registry)])
instrument(engine, meter_provider)
app.router.routes.append(metrics_route(registry=metrics_registry))


# -------------------------------------------------------------------- routes


@app.post("/users", status_code=201)
async def create_user(new: NewUser, db: DB) -> UserOut:
    user = User(name=new.name, email=new.email)
    db.add(user)
    try:
        await db.flush()  # the INSERT runs here, so a duplicate is a 409, not a 500
    except IntegrityError:
        raise HTTPException(409, f"a user with email {new.email!r} exists") from None
    return UserOut(id=user.id, name=user.name, email=user.email)


@app.get("/users/export")
async def export_users(db: DB, limit: int = 10_000) -> StreamingResponse:
    """NDJSON of the users, streamed with no connection held.

    The rows are read here, inside the endpoint; the session is committed and
    its connection returned when this function returns, before the first
    byte is sent, so a slow client cannot hold a pooled connection.
    """
    users = (await db.scalars(select(User).order_by(User.id).limit(limit))).all()
    rows = [{"id": u.id, "name": u.name, "email": u.email} for u in users]

    async def lines() -> AsyncIterator[str]:
        for row in rows:
            yield json.dumps(row) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@app.get("/users/{user_id}")
async def get_user(user_id: int, db: DB) -> UserOut:
    user = await db.get(User, user_id)
    if user is None:
        raise HTTPException(404, f"no user {user_id}")
    return UserOut(id=user.id, name=user.name, email=user.email)
