"""A Starlette app on an asyncpg pool (no SQLAlchemy) behind guardrails.

Run it (PostgreSQL at DATABASE_URL, a libpq URL)::

    DATABASE_URL=postgresql://user:password@127.0.0.1/db \\
        .venv/bin/uvicorn examples.asyncpg_app:app

then ``curl localhost:8000/now`` and ``curl localhost:8000/health/guardrails``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import guardrails as gr

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres")
POOL_SIZE = 5

state: dict[str, asyncpg.Pool] = {}


async def ping() -> None:
    """The ready probe for the pool, which exists once the lifespan has made it."""
    await gr.ping(state["pool"])()


guard = gr.Guardrails(
    concurrency=POOL_SIZE,
    queue_timeout=0.5,
    max_queue=16,
    breaker=gr.BreakerSettings(probe=ping),
)


@guard.read
async def server_time() -> str:
    # Pool.acquire(timeout=...) raises TimeoutError when the pool is exhausted: an outage
    # for the breaker, retried here because this read is idempotent.
    async with state["pool"].acquire(timeout=1.0) as conn:
        return str(await conn.fetchval("SELECT now()"))


async def now(request: Request) -> Response:
    return JSONResponse({"now": await server_time()})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=POOL_SIZE)
    state["pool"] = pool
    watcher = guard.watch_pool(pool, name="asyncpg")
    try:
        async with guard:  # the sampler and the probe run until shutdown
            yield
    finally:
        watcher.close()
        await pool.close()


app = Starlette(
    routes=[Route("/now", now), Route("/health/guardrails", guard.health)],
    lifespan=lifespan,
)
app.add_middleware(gr.GuardrailsMiddleware, guard=guard)
