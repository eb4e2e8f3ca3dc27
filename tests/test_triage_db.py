"""Each pool-trouble shape reproduced on real PostgreSQL, and the triage's verdict on it.

The guard samples once a second on its own; these tests call ``guard.sample()`` every
50 ms instead and look at a short triage window, so each shape takes a second or two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import guardrails as gr

pytestmark = pytest.mark.anyio

EngineFactory = Callable[..., AsyncEngine]
WINDOW = 1.5


def make_guard(**kwargs: Any) -> gr.Guardrails:
    return gr.Guardrails(
        early_warning=gr.EarlyWarning(triage_window=WINDOW, window=WINDOW, sustained=WINDOW),
        **kwargs,
    )


def app_for(guard: gr.Guardrails, routes: list[Route]) -> httpx.AsyncClient:
    app = Starlette(routes=routes, middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


async def sample_for(guard: gr.Guardrails, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        while True:
            guard.sample()
            await anyio.sleep(0.05)


async def test_a_healthy_run_is_none(async_engine_factory: EngineFactory) -> None:
    engine = async_engine_factory(pool_size=4, pool_timeout=1)
    guard = make_guard(concurrency=4)
    guard.watch_pool(engine, name="main")

    async def quick(request: Request) -> Response:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return PlainTextResponse("ok")

    async with app_for(guard, [Route("/q", quick)]) as client, anyio.create_task_group() as tg:
        tg.start_soon(sample_for, guard, WINDOW + 0.3)
        for _ in range(20):
            assert (await client.get("/q")).status_code == 200
            await anyio.sleep(0.05)
    assert guard.diagnosis.kind == "none"
    assert guard.snapshot()["triage"]["kind"] == "none"
    await guard.aclose()


async def test_slow_queries_under_a_burst_are_exhaustion_and_it_recovers(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=2, pool_timeout=2)
    guard = make_guard(concurrency=2, max_queue=2, queue_timeout=0.2)
    guard.watch_pool(engine, name="main")

    async def slow(request: Request) -> Response:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(0.2)"))
        return PlainTextResponse("ok")

    async with app_for(guard, [Route("/slow", slow)]) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample_for, guard, 1.2)
            for _ in range(6):  # bursts: 8 requests at a time against 2 connections
                for _ in range(8):
                    tg.start_soon(client.get, "/slow")
                await anyio.sleep(0.2)
        during = guard.snapshot()["triage"]
        await sample_for(guard, WINDOW + 0.3)  # traffic has stopped
    assert during["kind"] == "exhaustion"
    assert during["numbers"]["shed"] > 0
    assert "slots busy" in during["evidence"]
    assert guard.diagnosis.kind == "none"
    await guard.aclose()


async def test_an_endpoint_leaking_a_connection_per_call_is_a_leak(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=10, pool_timeout=1)
    guard = make_guard(concurrency=10)
    guard.watch_pool(engine, name="main")
    kept: list[AsyncConnection] = []

    async def leaky(request: Request) -> Response:
        conn = await engine.connect()  # an error path that forgets to close it
        await conn.execute(text("SELECT 1"))
        kept.append(conn)
        return PlainTextResponse("ok")

    async with app_for(guard, [Route("/leaky", leaky)]) as client, anyio.create_task_group() as tg:
        tg.start_soon(sample_for, guard, 1.3)
        for _ in range(6):  # low, steady traffic
            assert (await client.get("/leaky")).status_code == 200
            await anyio.sleep(0.2)
    triage = guard.snapshot()["triage"]
    for conn in kept:
        await conn.close()
    assert triage["kind"] == "leak"
    assert triage["numbers"]["checked_out"] >= 5
    assert triage["numbers"]["in_flight"] == 0
    assert triage["numbers"]["leak_suspects"] >= 5
    pool = guard.snapshot()["pools"][0]
    assert any(s["route"] == "/leaky" for s in pool["leak_suspects"])
    await guard.aclose()


async def test_many_small_pools_against_a_low_max_connections_are_a_storm(
    pg_cluster_factory: Callable[..., Any], async_engine_factory: EngineFactory
) -> None:
    server = pg_cluster_factory(max_connections=6)
    engines = [async_engine_factory(server=server, pool_size=2, pool_timeout=1) for _ in range(5)]
    guard = make_guard(concurrency=10, retry=gr.RetrySettings(attempts=1))
    for i, engine in enumerate(engines):
        guard.watch_pool(engine, name=f"instance-{i}")

    @guard.read
    async def hold(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(0.3)"))

    outcomes: list[str] = []

    async def one(engine: AsyncEngine) -> None:
        try:
            await hold(engine)
        except gr.Unavailable:
            outcomes.append("unavailable")
        else:
            outcomes.append("ok")

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample_for, guard, 1.0)
        for engine in engines:  # ten connections wanted, six allowed: a storm in small
            for _ in range(2):
                tg.start_soon(one, engine)
    triage = guard.snapshot()["triage"]
    assert "unavailable" in outcomes
    assert triage["kind"] == "storm"
    assert triage["numbers"]["refused"] >= 1
    await guard.aclose()


async def test_a_stopped_database_is_an_outage_named_by_its_route(
    pg_cluster_factory: Callable[..., Any],
    async_engine_factory: EngineFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = pg_cluster_factory(max_connections=10)
    engine = async_engine_factory(server=server, pool_size=2, pool_timeout=1)
    guard = make_guard(
        concurrency=4,
        breaker=gr.BreakerSettings(fail_max=2, reset_timeout=30),
        retry=gr.RetrySettings(attempts=1),
    )
    guard.watch_pool(engine, name="main")
    caplog.set_level(logging.WARNING, logger="guardrails.breaker")

    async def item(request: Request) -> Response:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return PlainTextResponse("ok")

    async with app_for(guard, [Route("/items/{item_id}", item)]) as client:
        assert (await client.get("/items/1")).status_code == 200
        guard.sample()
        await anyio.to_thread.run_sync(server.stop)
        try:
            answers = []
            for i in range(12):
                answers.append(await client.get(f"/items/{i}"))
                guard.sample()
        finally:
            await anyio.to_thread.run_sync(server.start)
    # Two outages open the breaker; the ten requests after them are refused at once.
    assert [r.json()["error"] for r in answers] == ["unavailable"] * 12
    assert guard.telemetry.shed == {
        ("outage", "/items/{item_id}"): 2,
        ("breaker_open", "/items/{item_id}"): 10,
    }
    opened_by = guard.breaker.opened_by
    assert opened_by is not None
    assert (opened_by["route"], opened_by["pool"]) == ("/items/{item_id}", None)
    error = opened_by["error"]
    assert error == "ConnectionRefusedError"  # asyncpg's connect to a stopped server
    (line,) = [r.getMessage() for r in caplog.records if "-> open" in r.getMessage()]
    assert line.endswith(f"opened by {error} on /items/{{item_id}})")
    triage = guard.snapshot()["triage"]
    assert triage["kind"] == "outage"
    assert triage["numbers"]["refused"] == 12
    assert triage["numbers"]["pool_timeouts"] == 0
    assert (
        f"12 request(s) were refused with 503 because the database was down; it opened on "
        f"{error} on /items/{{item_id}}; 0 pool timeout(s): the database is down"
    ) in triage["evidence"]
    health = guard.health.report()
    assert health["checks"]["triage:kind"][0]["observedValue"] == "outage"
    assert "pool trouble: outage" in health["output"]
    assert guard.snapshot()["telemetry"]["outage_refused_total"] == 12
    assert guard.snapshot()["breaker"]["refused_total"] == 10
    await guard.aclose()


async def test_a_full_bulkhead_on_a_real_pool_is_a_bulkhead_not_exhaustion(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=5, pool_timeout=2)
    guard = make_guard(
        concurrency=5,
        queue_timeout=0.1,
        policies={"/reports/{name}": gr.Policy(max_concurrency=1)},
    )
    guard.watch_pool(engine, name="main")

    async def report(request: Request) -> Response:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(0.4)"))
        return PlainTextResponse("ok")

    answers: list[int] = []

    async def one() -> None:
        answers.append((await client.get("/reports/monthly")).status_code)

    client = app_for(guard, [Route("/reports/{name}", report)])
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(sample_for, guard, 1.0)
        for _ in range(8):  # one runs, seven wait 100 ms for its one slot and are shed
            tg.start_soon(one)
    triage = guard.snapshot()["triage"]
    assert sorted(answers) == [200] + [503] * 7
    assert guard.telemetry.shed_by_bulkhead == {"/reports/{name}": 7}
    assert triage["kind"] == "bulkhead"
    assert triage["numbers"]["bulkhead_shed"] == 7
    assert triage["numbers"]["busy_fraction"] == 0.0
    assert "/reports/{name} shed 7 (its 1 slot(s) full in" in triage["evidence"]
    assert "all 5 global slots busy in 0%: the pool is not exhausted" in triage["evidence"]
    await guard.aclose()
