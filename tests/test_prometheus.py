"""Prometheus exposition after a scripted scenario, parsed back with prometheus_client."""

from __future__ import annotations

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.prometheus import GuardrailsCollector, metrics_endpoint

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
        guard.breaker.record(guard.breaker.admit(), ConnectionResetError())
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
    # Three admitted: two at once (in the lowest bucket), one after queueing ~50 ms.
    assert now[("guardrails_queue_wait_seconds_count", base)] == 3
    assert now[("guardrails_queue_wait_seconds_bucket", (("le", "0.001"),))] == 2
    assert now[("guardrails_queue_wait_seconds_bucket", (("le", "+Inf"),))] == 3
    assert now[("guardrails_queue_wait_seconds_sum", base)] >= 0.04
    # No raw paths in any label: only templates.
    assert "/items/10" not in after.text
    assert samples(during.text)[("guardrails_in_flight", base)] == 2
