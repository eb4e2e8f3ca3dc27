"""Clients cannot open the breaker for everyone: only the database's own failures count.

A Starlette app behind GuardrailsMiddleware, driven over ASGI. Its routes fail in the
ways a hostile or unlucky client can make them fail (a query parameter that reads like
a driver's message, a cache that is down, a client that hangs up); none of that is a
database outage. A real refused database connection, in the same app, still is.
"""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest
import redis.asyncio
from pgcluster import free_port
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Scope

import guardrails as gr

pytestmark = pytest.mark.anyio

NO_RETRY = Retry(NoBackoff(), 0)  # redis-py retries a refused connection by default

FAIL_MAX = 3
HITS = 40  # far more than FAIL_MAX


def guarded_app() -> tuple[Starlette, gr.Guardrails]:
    guard = gr.Guardrails(
        concurrency=4,
        breaker=gr.BreakerSettings(fail_max=FAIL_MAX, reset_timeout=60),
        retry=gr.RetrySettings(attempts=1),
    )

    async def items(request: Request) -> Response:
        page = int(request.query_params["page"])
        return PlainTextResponse(f"page {page}")

    async def cached(request: Request) -> Response:
        cache = redis.asyncio.Redis(port=free_port(), retry=NO_RETRY)
        try:
            return PlainTextResponse(str(await cache.get("key")))
        finally:
            await cache.aclose()

    async def partner(request: Request) -> Response:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{free_port()}/")
        return PlainTextResponse(answer.text)

    async def metrics(request: Request) -> Response:
        _, writer = await asyncio.open_connection("127.0.0.1", free_port())  # e.g. statsd
        writer.close()
        return PlainTextResponse("sent")

    async def rows(request: Request) -> Response:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
        try:
            return PlainTextResponse(str(await conn.fetchval("SELECT 1")))
        finally:
            await conn.close()

    app = Starlette(
        routes=[
            Route("/items", items),
            Route("/cached", cached),
            Route("/partner", partner),
            Route("/metrics", metrics),
            Route("/rows", rows),
        ],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    return app, guard


def client_for(app: Starlette) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://app")


async def test_outage_words_in_a_query_parameter_leave_the_breaker_closed() -> None:
    app, guard = guarded_app()
    words = ["connection refused", "too many clients already", "connection reset"]
    async with client_for(app) as client:
        statuses = [
            (await client.get("/items", params={"page": words[i % len(words)]})).status_code
            for i in range(HITS)
        ]
        ok = await client.get("/items?page=2")
    # The app's own ValueError reaches the client as its 500, never as a 503.
    assert statuses == [500] * HITS
    assert (ok.status_code, ok.text) == (200, "page 2")
    breaker = guard.snapshot()["breaker"]
    assert (breaker["state"], breaker["failures"]) == ("closed", 0)
    assert guard.limiter.in_flight == 0


async def test_the_apps_other_services_being_down_leave_the_breaker_closed() -> None:
    app, guard = guarded_app()
    async with client_for(app) as client:
        paths = ["/cached", "/partner", "/metrics"] * 12
        statuses = [(await client.get(path)).status_code for path in paths]
    assert statuses == [500] * len(paths)
    breaker = guard.snapshot()["breaker"]
    assert (breaker["state"], breaker["failures"]) == ("closed", 0)
    assert guard.limiter.in_flight == 0


async def test_clients_that_hang_up_leave_the_breaker_closed() -> None:
    """The server's ``send`` raises ConnectionResetError once the client has gone."""
    app, guard = guarded_app()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/items",
        "raw_path": b"/items",
        "root_path": "",
        "query_string": b"page=1",
        "headers": [(b"host", b"app")],
        "client": ("127.0.0.1", 1234),
        "server": ("app", 80),
    }
    for _ in range(HITS):
        with pytest.raises(ConnectionResetError):
            await app(scope, receive, send)
    breaker = guard.snapshot()["breaker"]
    assert (breaker["state"], breaker["failures"]) == ("closed", 0)
    assert guard.limiter.in_flight == 0


async def test_a_database_that_refuses_connections_still_opens_it() -> None:
    app, guard = guarded_app()
    async with client_for(app) as client:
        failed = [await client.get("/rows") for _ in range(FAIL_MAX)]
        refused = await client.get("/rows")
    # Each outage is answered 503 (no driver text); then the open breaker refuses at once.
    assert [r.status_code for r in failed] == [503] * FAIL_MAX
    assert all("Connect call failed" not in r.text for r in failed)
    assert guard.snapshot()["breaker"]["state"] == "open"
    assert refused.status_code == 503
