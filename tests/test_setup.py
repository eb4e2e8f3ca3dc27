"""What an app's setup gets right without trying: CORS on guardrails' own answers, POSTs
that only read, the default response store, and routes as Starlette allows them."""

from __future__ import annotations

import logging

import httpx
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

import guardrails as gr

pytestmark = pytest.mark.anyio

ORIGIN = "https://app.example"


def open_breaker(guard: gr.Guardrails) -> None:
    """Outages reported through the breaker's own API, as guard.read does."""
    while guard.breaker.state == "closed":
        trial = guard.breaker.admit()
        guard.breaker.record(trial, psycopg.OperationalError("connection refused"))


def client_for(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


async def page(request: Request) -> Response:
    return JSONResponse({"page": request.url.path})


async def test_refusals_and_stale_copies_carry_the_apps_cors_headers() -> None:
    guard = gr.Guardrails(concurrency=2)
    app = Starlette(
        routes=[Route("/items", page), Route("/cached", gr.policy(stale_ttl=60)(_cached))],
        # As the recipes show: guardrails added last, so outside CORSMiddleware.
        middleware=[
            Middleware(CORSMiddleware, allow_origins=[ORIGIN], allow_methods=["*"]),
            Middleware(gr.GuardrailsMiddleware, guard=guard),
        ],
    )
    async with client_for(app) as client:
        assert (await client.get("/cached", headers={"origin": ORIGIN})).status_code == 200
        open_breaker(guard)
        refused = await client.get("/items", headers={"origin": ORIGIN})
        stale = await client.get("/cached", headers={"origin": ORIGIN})
        preflight = await client.options(
            "/items",
            headers={"origin": ORIGIN, "access-control-request-method": "POST"},
        )
        other = await client.get("/items", headers={"origin": "https://evil.example"})
    assert refused.status_code == 503
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    assert int(refused.headers["retry-after"]) >= 1
    assert (stale.status_code, stale.headers["x-guardrails"]) == (200, "stale")
    assert stale.headers["access-control-allow-origin"] == ORIGIN
    # A preflight never touches the database: answered by CORS even while it is down.
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in other.headers
    assert guard.limiter.in_flight == 0


async def _cached(request: Request) -> Response:
    return JSONResponse({"cached": True})


async def test_a_post_that_only_reads_is_served_in_read_only_mode() -> None:
    @gr.policy(writes=False, priority="critical")
    async def login(request: Request) -> Response:
        return JSONResponse({"token": "t"})

    async def save(request: Request) -> Response:
        return JSONResponse({"saved": True})

    guard = gr.Guardrails(concurrency=2)
    app = Starlette(
        routes=[Route("/login", login, methods=["POST"]), Route("/save", save, methods=["POST"])],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    guard.set_read_only(True, reason="failover")
    async with client_for(app) as client:
        logged_in = await client.post("/login", json={"user": "a"})
        saved = await client.post("/save", json={})
    assert (logged_in.status_code, logged_in.json()) == (200, {"token": "t"})
    assert (saved.status_code, saved.json()["error"]) == (503, "read_only")


async def test_routes_with_stale_ttl_get_an_in_memory_store_by_default() -> None:
    guard = gr.Guardrails(concurrency=2)
    assert isinstance(guard.cache, gr.MemoryCache)
    app = Starlette(
        routes=[Route("/cached", gr.policy(stale_ttl=60)(_cached))],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    async with client_for(app) as client:
        await client.get("/cached")
        open_breaker(guard)
        stale = await client.get("/cached")
    assert (stale.status_code, stale.headers["x-guardrails"]) == (200, "stale")


async def test_cache_none_switches_it_off_and_says_which_routes_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = gr.Guardrails(concurrency=2, cache=None)
    app = Starlette(
        routes=[Route("/cached", gr.policy(stale_ttl=60)(_cached)), Route("/items", page)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    with caplog.at_level(logging.WARNING, logger="guardrails"):
        async with client_for(app) as client:
            for _ in range(3):
                await client.get("/cached")
            open_breaker(guard)
            refused = await client.get("/cached")
    assert refused.status_code == 503
    warned = [r.getMessage() for r in caplog.records if "cache=None" in r.getMessage()]
    assert len(warned) == 1
    assert "/cached" in warned[0]
    assert "/items" not in warned[0]


async def test_a_mount_and_its_route_may_share_a_parameter_name() -> None:
    @gr.policy(exempt=True)
    async def item(request: Request) -> Response:
        return JSONResponse(dict(request.path_params))

    guard = gr.Guardrails(concurrency=2)
    app = Starlette(
        routes=[Mount("/{id}", routes=[Route("/{id}", item)]), Route("/items", page)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    async with client_for(app) as client:
        answers = [await client.get("/1/2") for _ in range(2)]
        other = await client.get("/items")
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json() == {"id": "2"}
    assert other.status_code == 200
    # The endpoint's policy holds (exempt: no slot taken); the other route still counts.
    assert guard.limiter.admitted_total == 1
    resolved = guard.route_resolver().resolve(app, "GET", "/1/2")
    assert (resolved.template, resolved.bypass) == ("/{id}/{id}", True)


async def test_a_route_replaced_in_place_is_noticed() -> None:
    @gr.policy(exempt=True)
    async def exempt(request: Request) -> Response:
        return JSONResponse({})

    guard = gr.Guardrails(concurrency=2)
    app = Starlette(
        routes=[Route("/items", page)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    async with client_for(app) as client:
        await client.get("/items")
        assert guard.limiter.admitted_total == 1
        app.router.routes[0] = Route("/items", exempt)  # same length, another route
        for _ in range(1024):  # a full comparison runs at least once in this many
            await client.get("/items")
        admitted = guard.limiter.admitted_total
        for _ in range(10):
            await client.get("/items")
    assert admitted < 1025
    assert guard.limiter.admitted_total == admitted  # exempt from then on
