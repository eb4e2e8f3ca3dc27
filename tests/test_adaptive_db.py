"""The adaptive limit behind the middleware, against a real PostgreSQL and a real pool.

Slow holds are real ``pg_sleep`` queries; the pool timeout comes from a pool exhausted
by a connection held in one.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from test_guard_db import pool_held

import guardrails as gr

pytestmark = pytest.mark.anyio

EngineFactory = Callable[..., AsyncEngine]


def sleeping_app(guard: gr.Guardrails, engine: AsyncEngine, sleep: list[float]) -> Starlette:
    async def query(request: Request) -> PlainTextResponse:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": sleep[0]})
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/q", query)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )


async def test_the_limit_follows_slower_queries_down_and_comes_back_up(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=8, pool_timeout=5)
    guard = gr.Guardrails(
        concurrency=8, adaptive=gr.AdaptiveLimit(floor=2, window=0.1, min_samples=5)
    )
    # Holds of 50 ms, then 500 ms: far apart enough that a loaded machine's own delays
    # (tens of milliseconds) cannot pass for either.
    sleep = [0.05]
    app = sleeping_app(guard, engine, sleep)
    adaptive = guard.limiter.adaptive
    assert adaptive is not None
    limits: list[int] = []

    async def until(done: Callable[[], bool]) -> None:
        """Keep 8 clients busy until ``done()`` (or fail after a generous 20 s)."""

        async def client_loop(client: httpx.AsyncClient) -> None:
            while not done():
                response = await client.get("/q")
                assert response.status_code in (200, 503)
                limits.append(guard.limiter.limit)

        with anyio.fail_after(20):
            async with (
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://app"
                ) as client,
                anyio.create_task_group() as tg,
            ):
                for _ in range(8):
                    tg.start_soon(client_loop, client)

    windows = adaptive.windows_total
    await until(lambda: adaptive.windows_total >= windows + 3)
    assert adaptive.baseline is not None
    assert adaptive.baseline < 0.5

    sleep[0] = 0.5  # ten times the baseline: every window is slower
    await until(lambda: guard.limiter.limit <= 4)
    assert guard.snapshot()["limiter"]["adaptive"]["last_reason"] == "slower"
    assert guard.snapshot()["limiter"]["configured_limit"] == 8
    assert guard.limiter.in_flight == 0

    sleep[0] = 0.05
    await until(lambda: guard.limiter.limit == 8)
    assert adaptive.last is not None
    assert adaptive.last.reason == "healthy"
    assert min(limits) >= 2  # never below the floor
    assert guard.limiter.in_flight == 0
    assert guard.limiter.queued == 0


async def test_a_pool_timeout_is_a_drop_and_never_a_sample(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, pool_timeout=0.1)
    guard = gr.Guardrails(
        concurrency=8,
        adaptive=gr.AdaptiveLimit(window=0.05, min_samples=1),
        breaker=gr.BreakerSettings(fail_max=10),
    )
    guard.watch_pool(engine)
    app = sleeping_app(guard, engine, [0.0])
    adaptive = guard.limiter.adaptive
    assert adaptive is not None
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        async with pool_held(engine, 0.5):
            response = await client.get("/q")
        assert response.status_code == 503
        await anyio.sleep(0.06)
        guard.limiter.tick()
        # The timed-out request ended the window as a drop: 8 x 0.9. Had its 0.1 s wait
        # been a sample, the window would have learnt it as the baseline.
        assert (adaptive.drops_total, guard.limiter.limit) == (1, 7)
        assert adaptive.baseline is None
        assert (await client.get("/q")).status_code == 200
    assert guard.limiter.in_flight == 0
