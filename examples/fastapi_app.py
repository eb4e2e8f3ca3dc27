"""A FastAPI app on PostgreSQL behind guardrails, with routers, policies, health and metrics.

Run it (PostgreSQL at DATABASE_URL)::

    DATABASE_URL=postgresql+asyncpg://user:password@127.0.0.1/db \\
        .venv/bin/uvicorn examples.fastapi_app:app

then ``curl localhost:8000/api/items/1``, ``curl localhost:8000/api/reports/monthly``,
``curl localhost:8000/health/guardrails`` and ``curl localhost:8000/metrics``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, HTTPException
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.routing import Route

import guardrails as gr
from guardrails.prometheus import GuardrailsCollector, metrics_endpoint

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1/postgres")

budget = gr.ConnectionBudget(max_connections=100, reserved=3, processes=4)
engine = create_async_engine(
    DATABASE_URL, pool_size=budget.per_process, max_overflow=0, pool_timeout=2
)
guard = gr.Guardrails(
    budget=budget,
    queue_timeout=0.5,
    cache=gr.MemoryCache(),
    breaker=gr.BreakerSettings(probe=gr.ping(engine)),  # SELECT 1 through the engine
    policies={
        # Reports: shed first, at most two at a time, never longer than 15 s.
        "GET /api/reports/{path:path}": gr.Policy(priority="low", max_concurrency=2, timeout=15),
        # FastAPI's own pages never touch the database: no slot for them.
        "/docs": gr.Policy(needs_db=False),
        "/openapi.json": gr.Policy(needs_db=False),
    },
)
guard.watch_pool(engine, name="main")
registry = CollectorRegistry()
registry.register(GuardrailsCollector(guard))

items = APIRouter(prefix="/items")
reports = APIRouter(prefix="/reports")


@guard.read
async def fetch_item(item_id: int) -> dict[str, int] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT CAST(:id AS integer) AS id WHERE CAST(:id AS integer) > 0"),
                {"id": item_id},
            )
        ).first()
    return None if row is None else {"id": int(row.id)}


@items.get("/{item_id}")
@gr.policy(stale_ttl=300)  # FastAPI path operations take @gr.policy in either order
async def read_item(item_id: int) -> dict[str, int]:
    item = await fetch_item(item_id)
    if item is None:
        raise HTTPException(status_code=404)
    return item


@gr.policy(priority="critical")
@items.post("/{item_id}/checkout")
async def checkout(item_id: int) -> dict[str, str]:
    async with engine.begin() as conn:
        await conn.execute(text("SELECT CAST(:id AS integer)"), {"id": item_id})
    return {"status": "ok"}


@reports.get("/{name}")
async def report(name: str) -> dict[str, str]:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_sleep(0.2)"))
    return {"report": name}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with guard:  # the sampler (triage, early warnings) and the probe run meanwhile
        yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)
app.include_router(items, prefix="/api")
app.include_router(reports, prefix="/api")
app.router.routes.append(Route("/health/guardrails", guard.health))
app.router.routes.append(Route("/metrics", metrics_endpoint(registry)))
app.add_middleware(gr.GuardrailsMiddleware, guard=guard)
