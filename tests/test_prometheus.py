"""Prometheus exposition after a scripted scenario, parsed back with prometheus_client."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.observe.prometheus import GuardrailsCollector, metrics_endpoint

pytestmark = pytest.mark.anyio


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_counters_after_admits_queues_sheds_and_an_open_breaker() -> None:
    guard = gr.Guardrails(
        concurrency=2,
        max_queue=1,
        queue_timeout=5,
        breaker=gr.BreakerSettings(fail_max=1, reset_timeout=30),
    )
    registry = CollectorRegistry()
    registry.register(GuardrailsCollector(guard))
    release = anyio.Event()

    async def work(request: Request) -> Response:
        await release.wait()
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/items/{item_id}", work), Route("/metrics", metrics_endpoint(registry))],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        async with anyio.create_task_group() as tg:
            for i in range(3):  # two admitted at once, one queued
                tg.start_soon(client.get, f"/items/{i}")
            with anyio.fail_after(5):
                while guard.limiter.queued < 1:
                    await anyio.sleep(0.01)
            shed = [await client.get(f"/items/{i}") for i in range(10, 14)]  # queue full
            during = await client.get("/metrics")  # exempt: answers while every slot is taken
            await anyio.sleep(0.05)
            release.set()
        guard.breaker.record(guard.breaker.admit(), psycopg.OperationalError("connection failed"))
        refused = await client.get("/items/99")
        after = await client.get("/metrics")

    assert [r.status_code for r in shed] == [503] * 4
    assert refused.status_code == 503
    assert during.status_code == 200
    assert during.headers["content-type"].startswith("text/plain")
    now = samples(after.text)
    base: tuple[tuple[str, str], ...] = ()
    assert now[("guardrails_in_flight", base)] == 0
    assert now[("guardrails_limit", base)] == 2
    route = ("route", "/items/{item_id}")
    assert now[("guardrails_shed_total", (("reason", "queue_full"), route))] == 4
    assert now[("guardrails_shed_total", (("reason", "breaker_open"), route))] == 1
    assert now[("guardrails_breaker_state", (("state", "open"),))] == 1
    assert now[("guardrails_breaker_state", (("state", "closed"),))] == 0
    assert now[("guardrails_breaker_transitions_total", (("state", "open"),))] == 1
    # Opened by an outage outside any request: no route, no pool to name.
    assert now[("guardrails_breaker_opened_by_total", (("pool", ""), ("route", "")))] == 1
    # Three admitted: two at once (in the lowest bucket), one after queueing ~50 ms.
    assert now[("guardrails_queue_wait_seconds_count", base)] == 3
    assert now[("guardrails_queue_wait_seconds_bucket", (("le", "0.001"),))] == 2
    assert now[("guardrails_queue_wait_seconds_bucket", (("le", "+Inf"),))] == 3
    assert now[("guardrails_queue_wait_seconds_sum", base)] >= 0.04
    # No raw paths in any label: only templates.
    assert "/items/10" not in after.text
    assert samples(during.text)[("guardrails_in_flight", base)] == 2


async def test_pool_retry_and_fallback_metrics_on_a_real_pool(
    async_engine_factory: Callable[..., AsyncEngine],
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.1)
    guard = gr.Guardrails(
        concurrency=4,
        leak_threshold=0.2,
        breaker=gr.BreakerSettings(fail_max=3, reset_timeout=30),
        retry=gr.RetrySettings(attempts=2, base_delay=0.001, max_delay=0.002),
        cache=gr.MemoryCache(),
    )
    guard.watch_pool(engine, name="main")
    registry = CollectorRegistry()
    registry.register(GuardrailsCollector(guard))

    @guard.read
    async def count_rows() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT 1"))).scalar_one())

    @gr.policy(stale_ttl=60)
    async def dashboard(request: Request) -> Response:
        return PlainTextResponse(str(await count_rows()))

    app = Starlette(
        routes=[Route("/dashboard", dashboard), Route("/metrics", metrics_endpoint(registry))],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.get("/dashboard")).status_code == 200
        async with engine.connect() as held:  # held past leak_threshold: a leak suspect
            await held.execute(text("SELECT pg_sleep(0.3)"))
            # Two requests, each read retried once against the held pool: the breaker
            # opens at the third pool timeout and the stale page answers both.
            stale = [await client.get("/dashboard") for _ in range(2)]
            during = await client.get("/metrics")
        after = await client.get("/metrics")

    assert [r.headers.get("x-guardrails") for r in stale] == ["stale", "stale"]
    now = samples(after.text)
    pool = (("pool", "main"),)
    assert now[("guardrails_pool_size", pool)] == 1
    assert samples(during.text)[("guardrails_pool_checked_out", pool)] == 1
    assert now[("guardrails_pool_checked_out", pool)] == 0
    assert now[("guardrails_pool_timeouts_total", pool)] == 3
    assert now[("guardrails_pool_leak_suspects_total", pool)] == 1
    # Every acquire is timed: the two that got a connection and the three timeouts (the
    # second request's retry met the open breaker and never reached the pool).
    acquires = now[("guardrails_pool_acquire_wait_seconds_count", pool)]
    assert acquires == now[("guardrails_pool_acquire_wait_seconds_bucket", (("le", "+Inf"), *pool))]
    assert acquires == 2 + 3
    assert now[("guardrails_retries_total", (("outcome", "retried"),))] == 2
    assert now[("guardrails_breaker_state", (("state", "open"),))] == 1
    # The route and the pool of the pool timeout that opened it.
    opened_by = (("pool", "main"), ("route", "/dashboard"))
    assert now[("guardrails_breaker_opened_by_total", opened_by)] == 1
    fallbacks = (("kind", "stale"), ("route", "/dashboard"))
    assert now[("guardrails_fallbacks_total", fallbacks)] == 2


def test_the_adaptive_limit_its_ceiling_baseline_and_gradient_are_gauges() -> None:
    guard = gr.Guardrails(concurrency=20, adaptive=gr.AdaptiveLimit(window=0.001, min_samples=1))
    adaptive = guard.limiter.adaptive
    assert adaptive is not None
    for hold in (0.020, 0.060):  # learn 20 ms, then a window three times slower
        time.sleep(0.002)
        guard.limiter.completed(adaptive.clock() - hold)
    registry = CollectorRegistry()
    registry.register(GuardrailsCollector(guard))
    found = samples(generate_latest(registry).decode())
    assert found[("guardrails_limit", ())] == 16
    assert found[("guardrails_limit_ceiling", ())] == 20
    assert found[("guardrails_adaptive_baseline_seconds", ())] == pytest.approx(0.020, abs=1e-3)
    assert found[("guardrails_adaptive_gradient", ())] == pytest.approx(2 / 3, abs=0.01)
    # A fixed limit has no adaptive gauges.
    fixed = CollectorRegistry()
    fixed.register(GuardrailsCollector(gr.Guardrails(concurrency=20)))
    names = {name for name, _ in samples(generate_latest(fixed).decode())}
    assert "guardrails_limit_ceiling" in names
    assert "guardrails_adaptive_gradient" not in names
