"""A Starlette app on PostgreSQL behind guardrails: policies, fallback, health and metrics.

Run it (PostgreSQL at DATABASE_URL, e.g. postgresql+asyncpg://postgres@127.0.0.1/postgres)::

    DATABASE_URL=postgresql+asyncpg://user:password@127.0.0.1/db \\
        .venv/bin/uvicorn examples.starlette_app:app

then ``curl localhost:8000/dashboard``, ``curl localhost:8000/health/guardrails`` and
``curl localhost:8000/metrics``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.prometheus import GuardrailsCollector, metrics_endpoint

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1/postgres")

budget = gr.ConnectionBudget(max_connections=100, reserved=3, processes=2)
# One pool per process, created once, sized to the budget: an admitted request always
# finds a connection, and a short pool_timeout fails fast if one ever does not.
engine = create_async_engine(
    DATABASE_URL, pool_size=budget.per_process, max_overflow=0, pool_timeout=2
)

guard = gr.Guardrails(
    budget=budget,
    queue_timeout=0.5,
    max_queue=32,
    # Recovery: SELECT 1 through this engine every second while the breaker is open.
    breaker=gr.BreakerSettings(fail_max=5, probe=gr.ping(engine)),
    cache=gr.MemoryCache(max_entries=1_000),
    policies={"/reports/{name}": gr.Policy(priority="low", max_concurrency=2, timeout=10)},
)
guard.watch_pool(engine, name="main")
registry = CollectorRegistry()
registry.register(GuardrailsCollector(guard))


@guard.read
async def count_tables(conn: AsyncConnection) -> int:
    result = await conn.execute(text("SELECT count(*) FROM pg_catalog.pg_tables"))
    return int(result.scalar_one())


@gr.policy(stale_ttl=600)
async def dashboard(request: Request) -> Response:
    async with engine.connect() as conn:
        return JSONResponse({"tables": await count_tables(conn)})


async def report(request: Request) -> Response:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_sleep(0.5)"))
    return JSONResponse({"report": request.path_params["name"]})


@guard.write
async def save_note(body: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TEMP TABLE IF NOT EXISTS notes (body text)"))
        await conn.execute(text("INSERT INTO notes VALUES (:body)"), {"body": body})


async def add_note(request: Request) -> Response:
    await save_note((await request.body()).decode()[:200])
    return JSONResponse({"saved": True}, status_code=201)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with guard:  # the sampler (triage, early warnings) and the probe run meanwhile
        yield
    await engine.dispose()


app = Starlette(
    routes=[
        Route("/dashboard", dashboard),
        Route("/reports/{name}", report),
        Route("/notes", add_note, methods=["POST"]),
        Route("/health/guardrails", guard.health),
        Route("/livez", guard.health.live),
        Route("/readyz", guard.health.ready),
        Route("/metrics", metrics_endpoint(registry)),
    ],
    lifespan=lifespan,
)
app.add_middleware(gr.GuardrailsMiddleware, guard=guard)
