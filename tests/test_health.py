"""The health endpoint: shape, status codes, liveness vs readiness, and what it never shows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

import guardrails as gr

pytestmark = pytest.mark.anyio


def build(guard: gr.Guardrails, handler: Callable[[Request], Any] | None = None) -> Starlette:
    async def work(request: Request) -> Response:
        if handler is not None:
            await handler(request)
        return PlainTextResponse("done")

    return Starlette(
        routes=[
            Route("/work", work),
            Route("/health/guardrails", guard.health),
            Route("/livez", guard.health.live),
            Route("/readyz", guard.health.ready),
            Mount("/mounted", app=guard.health),
        ],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


def open_breaker(guard: gr.Guardrails) -> None:
    # Outcomes reported through the breaker's own API, as guard.read does.
    for _ in range(guard.breaker.settings.fail_max):
        guard.breaker.record(guard.breaker.admit(), psycopg.OperationalError("connection failed"))


async def test_a_healthy_guard_passes_with_the_draft_shape() -> None:
    guard = gr.Guardrails(concurrency=4)
    async with client(build(guard)) as c:
        response = await c.get("/health/guardrails")
        mounted = await c.get("/mounted/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/health+json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["status"] == "pass"
    assert "output" not in body
    checks = body["checks"]
    assert checks["breaker:state"][0]["observedValue"] == "closed"
    assert checks["breaker:state"][0]["status"] == "pass"
    assert checks["limiter:in_flight"][0]["limit"] == 4
    for entries in checks.values():
        assert isinstance(entries, list)
        assert {"observedValue", "status", "time"} <= entries[0].keys()
        assert entries[0]["status"] in ("pass", "warn", "fail")
    assert mounted.status_code == 200
    assert mounted.json()["status"] == "pass"


async def test_open_fails_readiness_but_never_liveness() -> None:
    guard = gr.Guardrails(concurrency=4, breaker=gr.BreakerSettings(fail_max=2, reset_timeout=30))
    open_breaker(guard)
    async with client(build(guard)) as c:
        full = await c.get("/health/guardrails")
        live = await c.get("/livez")
        ready = await c.get("/readyz")
        work = await c.get("/work")
    assert (full.status_code, live.status_code, ready.status_code) == (503, 200, 503)
    body = full.json()
    assert body["status"] == "fail"
    assert body["checks"]["breaker:state"][0]["observedValue"] == "open"
    assert 29 <= body["checks"]["breaker:retry_after"][0]["observedValue"] <= 30
    assert "circuit breaker open" in body["output"]
    assert live.json()["status"] == "pass"
    assert work.status_code == 503  # the app itself refuses database work meanwhile


async def test_half_open_and_read_only_warn_with_200() -> None:
    guard = gr.Guardrails(concurrency=4, breaker=gr.BreakerSettings(fail_max=1, reset_timeout=0.05))
    open_breaker(guard)
    await anyio.sleep(0.06)
    trial = guard.breaker.admit()  # a trial in flight: half-open
    async with client(build(guard)) as c:
        half_open = await c.get("/health/guardrails")
        guard.breaker.record(trial)
        guard.set_read_only(True, reason="failover to the replica at db-2.internal:5432")
        read_only = await c.get("/health/guardrails")
    assert half_open.status_code == 200
    assert half_open.json()["status"] == "warn"
    assert half_open.json()["checks"]["breaker:state"][0]["status"] == "warn"
    assert read_only.status_code == 200
    body = read_only.json()
    assert body["status"] == "warn"
    assert body["checks"]["read_only:enabled"][0]["observedValue"] is True
    assert "db-2.internal" not in read_only.text  # the reason is for logs, not for probes


async def test_fail_on_is_configurable_and_checked() -> None:
    guard = gr.Guardrails(concurrency=4, health_fail_on=("read_only",))
    guard.set_read_only(True)
    async with client(build(guard)) as c:
        assert (await c.get("/health/guardrails")).status_code == 503
    with pytest.raises(ValueError, match="unknown fail_on condition"):
        gr.Guardrails(concurrency=4, health_fail_on=("database_slow",))


async def test_answers_while_every_slot_is_taken() -> None:
    guard = gr.Guardrails(concurrency=2, max_queue=0)
    release = anyio.Event()

    async def hold(request: Request) -> None:
        await release.wait()

    async with client(build(guard, hold)) as c, anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(c.get, "/work")
        with anyio.fail_after(5):
            while guard.limiter.in_flight < 2:
                await anyio.sleep(0.01)
        shed = await c.get("/work")
        health = await c.get("/health/guardrails")
        release.set()
    assert shed.status_code == 503
    assert health.status_code == 200
    assert health.json()["checks"]["limiter:in_flight"][0]["observedValue"] == 2


async def test_answers_while_postgres_is_stopped_and_shows_no_secrets(
    pg_cluster_factory: Callable[..., Any], async_engine_factory: Callable[..., AsyncEngine]
) -> None:
    server = pg_cluster_factory(max_connections=20)
    engine = async_engine_factory(server=server, pool_size=1, pool_timeout=0.5)
    guard = gr.Guardrails(concurrency=4, breaker=gr.BreakerSettings(fail_max=2))
    guard.watch_pool(engine, name="main")

    async def query(request: Request) -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async with client(build(guard, query)) as c:
        assert (await c.get("/work")).status_code == 200
        await anyio.to_thread.run_sync(server.stop)
        failures = [await c.get("/work") for _ in range(2)]
        acquires = guard.snapshot()["pools"][0]["acquires_total"]
        started = anyio.current_time()
        health = await c.get("/health/guardrails")
        took = anyio.current_time() - started
        assert guard.snapshot()["pools"][0]["acquires_total"] == acquires  # no DB touched
    assert [r.status_code for r in failures] == [503, 503]
    assert health.status_code == 503
    assert took < 0.5
    text_seen = health.text + "".join(r.text for r in failures)
    for secret in (
        str(server.port),
        server.host,
        "postgres",
        "asyncpg",
        "onnection refused",
        "Errno",
    ):
        assert secret not in text_seen
    checks = health.json()["checks"]
    assert checks["pool:main:checked_out"][0]["observedValue"] == 0
    assert checks["pool:main:waiting"][0]["observedValue"] == 0
    assert checks["pool:main:acquire_wait_p95"][0]["observedUnit"] == "s"


async def test_sustained_utilization_warns_before_anything_is_shed() -> None:
    guard = gr.Guardrails(
        concurrency=2,
        max_queue=10,
        early_warning=gr.EarlyWarning(utilization=0.8, sustained=0.3, window=0.3),
    )
    release = anyio.Event()

    async def hold(request: Request) -> None:
        await release.wait()

    async with client(build(guard, hold)) as c, anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(c.get, "/work")
        with anyio.fail_after(5):
            while guard.limiter.in_flight < 2:
                await anyio.sleep(0.01)
        before = (await c.get("/health/guardrails")).json()
        for _ in range(8):
            guard.sample()
            await anyio.sleep(0.05)
        during = await c.get("/health/guardrails")
        release.set()
    assert before["status"] == "pass"
    assert during.status_code == 200
    body = during.json()
    assert body["status"] == "warn"
    assert body["checks"]["warning:utilization"][0]["observedValue"] == 1.0
    assert "slots busy" in body["output"]
    assert guard.limiter.shed_total == 0


async def test_after_an_outage_the_report_counts_the_refusals_and_says_outage() -> None:
    guard = gr.Guardrails(concurrency=4, early_warning=gr.EarlyWarning(triage_window=5))
    guard.sample()
    open_breaker(guard)
    async with client(build(guard)) as c:
        refused = [await c.get("/work") for _ in range(3)]
        guard.sample()
        guard.breaker.force_close()  # the database is back
        guard.sample()
        guard.sample()
        after = (await c.get("/health/guardrails")).json()
    assert [r.status_code for r in refused] == [503] * 3
    assert after["status"] == "warn"
    triage = after["checks"]["triage:kind"][0]
    assert triage["observedValue"] == "outage"
    assert "(now closed) and 3 request(s) were refused with 503" in triage["output"]
    snapshot = guard.snapshot()
    assert snapshot["breaker"]["refused_total"] == 3
    assert snapshot["telemetry"]["outage_refused_total"] == 3
    assert snapshot["limiter"]["shed_total"] == 0  # the limiter never saw them


async def test_an_adaptive_limit_shows_its_limit_ceiling_baseline_and_gradient() -> None:
    guard = gr.Guardrails(concurrency=20, adaptive=gr.AdaptiveLimit(window=0.001, min_samples=1))
    adaptive = guard.limiter.adaptive
    assert adaptive is not None
    for hold in (0.020, 0.060):  # learn 20 ms, then a window three times slower
        await anyio.sleep(0.002)
        guard.limiter.completed(adaptive.clock() - hold)
    async with client(build(guard)) as c:
        body = (await c.get("/health/guardrails")).json()
    (check,) = body["checks"]["limiter:adaptive_limit"]
    assert (check["observedValue"], check["ceiling"], check["floor"]) == (16, 20, 1)
    assert check["status"] == "warn"
    assert check["baselineSeconds"] == pytest.approx(0.020, abs=1e-3)
    assert check["gradient"] == pytest.approx(2 / 3, abs=0.01)
    assert body["status"] == "pass"  # a lowered limit is no reason to take it out of service
    fixed = gr.Guardrails(concurrency=20)
    async with client(build(fixed)) as c:
        assert "limiter:adaptive_limit" not in (await c.get("/health/guardrails")).json()["checks"]
