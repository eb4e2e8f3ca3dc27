"""The app each server of the fleet tests runs: one per-process pool, one guard.

Configured by environment variables (set by ``tests/test_coordinator.py``):
``GR_DSN`` (SQLAlchemy asyncpg URL), ``GR_APP_NAME`` (application_name of its
connections), ``GR_CONCURRENCY``, ``GR_SLEEP`` (seconds per query), and, for a
coordinated fleet, ``GR_REDIS``, ``GR_BUDGET``, ``GR_PER_PROCESS``, ``GR_NAME`` and optionally
``GR_LEASE_TTL`` (seconds, default 1) and ``GR_TIMEOUT`` (seconds per Redis call).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.observe.triage import refused_as_too_many

CONCURRENCY = int(os.environ["GR_CONCURRENCY"])
SLEEP = float(os.environ.get("GR_SLEEP", "0.1"))
REFUSING_PORT = int(os.environ.get("GR_REFUSING_PORT", "1"))

# One idle connection kept; the rest are opened for a request and closed after it, so
# the server's connection count follows the admitted work.
engine = create_async_engine(
    os.environ["GR_DSN"],
    pool_size=1,
    max_overflow=CONCURRENCY - 1,
    pool_timeout=5,
    connect_args={"server_settings": {"application_name": os.environ["GR_APP_NAME"]}},
)

coordinator = None
if os.environ.get("GR_REDIS"):
    coordinator = gr.RedisCoordinator(
        os.environ["GR_REDIS"],
        budget=int(os.environ["GR_BUDGET"]),
        per_process=int(os.environ["GR_PER_PROCESS"]),
        name=os.environ["GR_NAME"],
        lease_ttl=float(os.environ.get("GR_LEASE_TTL", "1.0")),
        timeout=float(os.environ.get("GR_TIMEOUT", "0.25")),
    )
guard = gr.Guardrails(
    concurrency=CONCURRENCY,
    reserve_critical=0,
    queue_timeout=1.0,
    max_queue=200,
    breaker=gr.BreakerSettings(fail_max=1, reset_timeout=1.0),
    read_only_on_open=False,
    coordinator=coordinator,
)
counts = {"ok": 0, "too_many": 0, "errors": 0}


async def query(request: Request) -> Response:
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": SLEEP})
    except Exception as exc:
        counts["too_many" if refused_as_too_many(exc) else "errors"] += 1
        raise
    counts["ok"] += 1
    return JSONResponse({"ok": True})


async def down(request: Request) -> Response:
    """A real outage: the database on this port refuses the driver's connections."""
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{REFUSING_PORT}/postgres")
    await conn.close()
    return JSONResponse({"ok": True})


@gr.policy(exempt=True)
async def stats(request: Request) -> Response:
    snapshot = guard.snapshot()
    return JSONResponse(
        {
            "pid": os.getpid(),
            "counts": counts,
            "limiter": snapshot["limiter"],
            "breaker": snapshot["breaker"],
            "transitions": guard.telemetry.breaker_transitions,
            "coordinator": snapshot["coordinator"],
        }
    )


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with guard:  # the coordinator leases from startup on, not from the first request
        yield
    await engine.dispose()


app = Starlette(
    routes=[Route("/query", query), Route("/down", down), Route("/stats", stats)],
    middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    lifespan=lifespan,
)
