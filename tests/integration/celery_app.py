"""The Celery app of test_runner.py's prefork test: tasks calling ``asyncpool.run``.

Not a test module. Configured by the environment the test gives the worker:
``ASYNCPOOL_TEST_DSN``, ``ASYNCPOOL_CELERY_BROKER`` (broker and result
backend), ``ASYNCPOOL_CELERY_NAME`` (queue, pool name and
``application_name``), ``ASYNCPOOL_CELERY_POOL_SIZE``. With
``ASYNCPOOL_CELERY_PARENT_QUERY=1`` the importing process (the worker's
parent, before it forks its pool children) queries once through
``asyncpool.run``, as an app that warms up or checks the database at import.
"""

from __future__ import annotations

import os

from celery import Celery
from sqlalchemy import text

import asyncpool

NAME = os.environ.get("ASYNCPOOL_CELERY_NAME", "ap-celery")
BROKER = os.environ.get("ASYNCPOOL_CELERY_BROKER", "redis://127.0.0.1:6379/7")

app = Celery("asyncpool_runner_test", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=NAME,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
    result_expires=600,
)

engine = asyncpool.create_pooled_engine(
    os.environ.get("ASYNCPOOL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    name=NAME,
    application_name=NAME,
    pool_size=int(os.environ.get("ASYNCPOOL_CELERY_POOL_SIZE", "2")),
)


async def backend_pid() -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


#: The parent's backend, queried before the fork (inherited by the children).
PARENT_BACKEND: int | None = None
if os.environ.get("ASYNCPOOL_CELERY_PARENT_QUERY") == "1":
    PARENT_BACKEND = asyncpool.run(backend_pid())


@app.task(name="asyncpool_test.backend_pid")
def query() -> tuple[int, int, int | None]:
    """(worker child's pid, the backend that served it, the parent's backend)."""
    return os.getpid(), asyncpool.run(backend_pid()), PARENT_BACKEND
