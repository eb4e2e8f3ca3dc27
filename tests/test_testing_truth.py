"""The helpers tell the truth: an injected outage and a stopped PostgreSQL look the same to clients.

One scenario, run twice on the same app, once with ``database_down`` on the guard's
watched pool and once with the real server stopped: every answer's status,
``Retry-After``, stale marker and error must be the same, and so must the breaker's
state. The breaker runs on a manual clock in both runs, so ``Retry-After`` does not
depend on how fast the machine is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

import anyio.to_thread
import asyncpg
import httpx
import pytest
from pgcluster import PostgresServer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.testing import InstantRetries, breaker_clock, database_down

pytestmark = pytest.mark.anyio

Query = Callable[[], Awaitable[int]]
Answer = tuple[int, str | None, str | None, str | None]

# What the clients send once the database is down, in order (one was stored before).
REQUESTS = [
    ("GET", "/dashboard"),  # two refused attempts; the stored page, marked stale
    ("GET", "/plain"),  # unguarded: the driver's error escapes the app; 503, Retry-After 1
    ("GET", "/orders"),  # two more: fail_max (5) reached, the breaker opens; 503, 30
    ("GET", "/dashboard"),  # breaker open: stale, the app not run
    ("GET", "/orders"),  # breaker open: 503, Retry-After 30
    ("POST", "/notes"),  # read-only while open: 503 read_only
    ("GET", "/health/guardrails"),  # fails while the breaker is open
]


@asynccontextmanager
async def sqlalchemy_query(server: PostgresServer) -> AsyncIterator[tuple[Any, Query]]:
    engine = create_async_engine(server.dsn("asyncpg"), pool_size=2, max_overflow=0, pool_timeout=1)

    async def query() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT 41 + 1"))).scalar_one())

    try:
        yield engine, query
    finally:
        await engine.dispose()


@asynccontextmanager
async def asyncpg_query(server: PostgresServer) -> AsyncIterator[tuple[Any, Query]]:
    pool = await asyncpg.create_pool(server.dsn(), min_size=1, max_size=2)

    async def query() -> int:
        async with pool.acquire(timeout=1) as conn:
            return int(await conn.fetchval("SELECT 41 + 1"))

    try:
        yield pool, query
    finally:
        pool.terminate()


POOLS: dict[str, Callable[[PostgresServer], AbstractAsyncContextManager[tuple[Any, Query]]]] = {
    "sqlalchemy": sqlalchemy_query,
    "asyncpg": asyncpg_query,
}


def build(guard: gr.Guardrails, query: Query) -> Starlette:
    read = guard.read(query)
    write = guard.write(query)

    @gr.policy(stale_ttl=600)
    async def dashboard(request: Request) -> Response:
        return JSONResponse({"answer": await read()})

    async def orders(request: Request) -> Response:
        return JSONResponse({"orders": await read()})

    async def plain(request: Request) -> Response:
        return JSONResponse({"plain": await query()})

    async def notes(request: Request) -> Response:
        return JSONResponse({"saved": await write()}, status_code=201)

    return Starlette(
        routes=[
            Route("/dashboard", dashboard),
            Route("/orders", orders),
            Route("/plain", plain),
            Route("/notes", notes, methods=["POST"]),
            Route("/health/guardrails", guard.health),
        ],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )


def seen(response: httpx.Response) -> Answer:
    """What a client can see of an answer, without the bits that differ by time (Age)."""
    error = None
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
    return (
        response.status_code,
        response.headers.get("retry-after"),
        response.headers.get("x-guardrails"),
        error,
    )


async def scenario(
    server: PostgresServer, kind: str, outage: str
) -> tuple[Answer, list[Answer], str]:
    guard = gr.Guardrails(
        concurrency=4,
        cache=gr.MemoryCache(),
        breaker=gr.BreakerSettings(fail_max=5, reset_timeout=30),
        retry=gr.RetrySettings(attempts=2),
    )
    async with POOLS[kind](server) as (pool, query):
        guard.watch_pool(pool, name="main")
        app = build(guard, query)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            with breaker_clock(guard):
                before = seen(await client.get("/dashboard"))
                if outage == "stopped":
                    await anyio.to_thread.run_sync(server.stop)
                faults = database_down(guard) if outage == "injected" else nullcontext()
                try:
                    with faults:
                        during = [seen(await client.request(m, path)) for m, path in REQUESTS]
                finally:
                    if outage == "stopped":
                        await anyio.to_thread.run_sync(server.start)
    return before, during, guard.breaker.state.value


@pytest.mark.parametrize("kind", sorted(POOLS))
async def test_an_injected_outage_looks_like_a_stopped_database(
    kind: str,
    pg_cluster_factory: Callable[..., PostgresServer],
    guardrails_instant_retries: InstantRetries,
) -> None:
    server = pg_cluster_factory(max_connections=20)
    injected = await scenario(server, kind, "injected")
    stopped = await scenario(server, kind, "stopped")
    assert injected == stopped
    before, during, state = stopped
    assert before == (200, None, None, None)
    assert during == [
        (200, None, "stale", None),
        (503, "1", None, "unavailable"),
        (503, "30", None, "unavailable"),
        (200, None, "stale", None),
        (503, "30", None, "unavailable"),
        (503, "30", None, "read_only"),
        (503, None, None, None),
    ]
    assert state == "open"
    server.close()
