"""guardrails.testing.ChaosMiddleware: off unless enabled, rates from a seed, a cap, per route."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

import guardrails as gr
from guardrails.testing import ChaosMiddleware, ChaosRule
from guardrails.testing.chaos import ENV_VAR

pytestmark = pytest.mark.anyio

ALWAYS_503 = ChaosRule(outcome_rate=1.0)


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


def scope_for(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "root_path": "",
        "headers": headers or [],
        "query_string": b"",
    }


class Statuses:
    """An ASGI ``send`` that keeps the status of each response."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.seen.append(message["status"])


async def nothing() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


# -- off unless enabled ---------------------------------------------------------------------


async def test_off_by_default_on_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    statuses: dict[str, int] = {}
    cases = {
        "default": {},
        "env": {"env": "1"},
        "explicit": {"enabled": True},
        "env, but False": {"env": "1", "enabled": False},
        "env says no": {"env": "0"},
    }
    for name, case in cases.items():
        if "env" in case:
            monkeypatch.setenv(ENV_VAR, case["env"])
        else:
            monkeypatch.delenv(ENV_VAR, raising=False)
        options = {k: v for k, v in case.items() if k != "env"}
        chaos = ChaosMiddleware(hello, default=ALWAYS_503, **options)
        async with client_for(chaos) as client:
            statuses[name] = (await client.get("/")).status_code
    assert statuses == {
        "default": 200,
        "env": 503,
        "explicit": 503,
        "env, but False": 200,
        "env says no": 200,
    }


async def test_a_chaos_answer_says_what_it_is() -> None:
    chaos = ChaosMiddleware(hello, enabled=True, default=ChaosRule(outcome_rate=1.0))
    async with client_for(chaos) as client:
        answer = await client.get("/")
    assert answer.status_code == 503
    assert answer.json() == {"error": "chaos"}
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["x-guardrails-chaos"] == "outcome"
    assert chaos.snapshot() == {
        "enabled": True,
        "active": 0,
        "latency": 0,
        "fault": 0,
        "outcome": 1,
        "capped": 0,
    }


# -- rates, routes, the cap --------------------------------------------------------------------


async def test_each_rate_is_within_three_sigma_over_10000_requests() -> None:
    n = 10_000
    rule = ChaosRule(latency=1e-9, latency_rate=0.3, fault_rate=0.1, outcome_rate=0.2)
    guard = gr.Guardrails(concurrency=1)  # no pool watched: the faults find nothing to refuse
    chaos = ChaosMiddleware(hello, enabled=True, guard=guard, default=rule, seed=42)
    send = Statuses()
    for _ in range(n):
        await chaos(scope_for("/"), nothing, send)
    assert send.seen.count(503) == chaos.injected["outcome"]
    expected = {
        "latency": 0.3,
        "outcome": 0.2,
        "fault": 0.1 * (1 - 0.2),  # an answered request runs no app, so it has no fault
    }
    for name, p in expected.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(chaos.injected[name] - n * p) <= 3 * sigma, (name, chaos.injected[name])


async def test_rules_go_by_route_first_match_then_default() -> None:
    chaos = ChaosMiddleware(
        hello,
        enabled=True,
        routes={
            "/items/{id:int}": ChaosRule(outcome_rate=1.0, outcome_status=500),
            "/items/{name}": ALWAYS_503,
        },
    )
    send = Statuses()
    for path in ("/items/7", "/items/seven", "/other", "/items/7"):
        await chaos(scope_for(path), nothing, send)
    assert send.seen == [500, 503, 200, 500]
    mounted = {**scope_for("/app/items/7"), "root_path": "/app"}
    await chaos(mounted, nothing, send)
    assert send.seen[-1] == 500


async def test_at_most_max_active_requests_are_under_chaos() -> None:
    inside = 0
    gate = anyio.Event()

    async def held(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal inside
        inside += 1
        await gate.wait()
        await hello(scope, receive, send)

    rule = ChaosRule(latency=0.001, latency_rate=1.0)
    chaos = ChaosMiddleware(held, enabled=True, default=rule, max_active=2)
    send = Statuses()
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(chaos, scope_for("/"), nothing, send)
        with anyio.fail_after(5):
            while inside < 5:
                await anyio.sleep(0.001)
        assert chaos.active == 2
        gate.set()
    assert send.seen == [200] * 5
    assert (chaos.injected["latency"], chaos.injected["capped"], chaos.active) == (2, 3, 0)


# -- header control ------------------------------------------------------------------------


async def test_the_header_is_ignored_unless_header_control_is_on() -> None:
    asking = {"x-guardrails-chaos": "outcome=429"}
    ignoring = ChaosMiddleware(hello, enabled=True)
    obeying = ChaosMiddleware(hello, enabled=True, header_control=True)
    async with client_for(ignoring) as client:
        assert (await client.get("/", headers=asking)).status_code == 200
    async with client_for(obeying) as client:
        limited = await client.get("/", headers=asking)
        slowed = await client.get("/", headers={"x-guardrails-chaos": "latency=0.001"})
        garbage = await client.get("/", headers={"x-guardrails-chaos": "latency=x, outcome=99"})
        plain = await client.get("/")
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "1")
    assert (slowed.status_code, slowed.headers["x-guardrails-chaos"]) == (200, "latency")
    assert garbage.status_code == 200
    assert "x-guardrails-chaos" not in garbage.headers
    assert plain.status_code == 200
    assert obeying.injected["outcome"] == obeying.injected["latency"] == 1


# -- a database fault is a real-looking outage for the guard ---------------------------------


async def test_a_fault_fails_only_the_chosen_requests_database_work(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    guard = gr.Guardrails(concurrency=4, cache=gr.MemoryCache(), retry=gr.RetrySettings(attempts=1))

    async def query() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT 7"))).scalar_one())

    @gr.policy(stale_ttl=600)
    async def dashboard(request: Request) -> Response:
        return JSONResponse({"value": await query()})

    async def other(request: Request) -> Response:
        return JSONResponse({"value": await query()})

    chaos = {"enabled": True, "guard": guard, "routes": {"/dashboard": ChaosRule(fault_rate=1.0)}}
    app = Starlette(
        routes=[Route("/dashboard", dashboard), Route("/other", other)],
        middleware=[
            Middleware(gr.GuardrailsMiddleware, guard=guard),  # outermost
            Middleware(ChaosMiddleware, **chaos),
        ],
    )
    async with client_for(app) as client:
        first = await client.get("/dashboard")  # pool not watched yet: the fault finds none
        guard.watch_pool(engine, name="main")
        stale = await client.get("/dashboard")
        other_answer = await client.get("/other")
    await engine.dispose()
    assert first.status_code == 200
    assert (stale.status_code, stale.headers["x-guardrails"]) == (200, "stale")
    assert stale.json() == first.json() == {"value": 7}
    assert other_answer.json() == {"value": 7}  # the same pool, another request: untouched
    (pool,) = guard.snapshot()["pools"]
    assert (pool["timeouts_total"], pool["acquires_total"]) == (1, 1)


# -- bad configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"default": ChaosRule(fault_rate=0.1)}, ValueError, "pass guard=guard"),
        ({"routes": {"items": ALWAYS_503}}, ValueError, "path pattern"),
        ({"routes": [("/", ALWAYS_503)]}, TypeError, "mapping of path pattern"),
        ({"routes": {"/": 0.5}}, TypeError, "must be a ChaosRule"),
        ({"max_active": 0}, ValueError, "max_active"),
        ({"enabled": "yes"}, TypeError, "enabled must be True, False or None"),
        ({"header_control": 1}, TypeError, "header_control"),
    ],
)
def test_bad_configuration_is_refused(
    kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        ChaosMiddleware(hello, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"outcome_status": 200}, ValueError, "HTTP error status"),
        ({"fault_rate": 2}, ValueError, "between 0 and 1"),
        ({"latency": -1}, ValueError, "positive number of seconds"),
    ],
)
def test_bad_rules_are_refused(kwargs: dict[str, Any], error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        ChaosRule(**kwargs)
