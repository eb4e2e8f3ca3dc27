"""End to end: real HTTP to uvicorn on loopback, a real SQLAlchemy pool on real PostgreSQL."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

import guardrails as gr

pytestmark = pytest.mark.anyio

QUERY_SECONDS = 0.2


def build_app(engine: AsyncEngine, guard: gr.Guardrails | None) -> Starlette:
    async def sleep(request: Request) -> Response:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": QUERY_SECONDS})
        return PlainTextResponse("slept")

    async def stream(request: Request) -> Response:
        async def rows() -> AsyncIterator[bytes]:
            async with engine.connect() as conn:
                for i in range(3):
                    result = await conn.execute(
                        text("SELECT CAST(:i AS integer), pg_sleep(0.05)"), {"i": i}
                    )
                    yield f"row {result.first()[0]}\n".encode()

        return StreamingResponse(rows(), media_type="text/plain")

    middleware = [Middleware(gr.GuardrailsMiddleware, guard=guard)] if guard else []
    return Starlette(
        routes=[Route("/sleep", sleep), Route("/stream", stream)], middleware=middleware
    )


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="none", access_log=False)
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: server.serve(sockets=[sock]))
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()


async def burst(base_url: str, path: str, count: int) -> list[tuple[int, float, dict[str, Any]]]:
    """Send ``count`` requests at once; return (status, finished_at, json-or-empty) each."""
    results: list[tuple[int, float, dict[str, Any]]] = []
    limits = httpx.Limits(max_connections=count + 5)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:

        async def one() -> None:
            response = await client.get(path)
            is_json = response.headers.get("content-type") == "application/json"
            results.append(
                (response.status_code, anyio.current_time(), response.json() if is_json else {})
            )

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
    return results


async def test_without_guardrails_the_pool_timeout_reaches_clients(
    async_engine_factory: Callable[..., AsyncEngine],
) -> None:
    # The control: the same burst on the same pool, unguarded, fails the way users see it.
    engine = async_engine_factory(pool_size=2, max_overflow=0, pool_timeout=0.1)
    async with serve(build_app(engine, None)) as url:
        results = await burst(url, "/sleep", 20)
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(500) >= 10
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_guardrails_sheds_the_excess_and_no_pool_timeout_reaches_clients(
    async_engine_factory: Callable[..., AsyncEngine],
) -> None:
    engine = async_engine_factory(pool_size=2, max_overflow=0, pool_timeout=0.1)
    guard = gr.Guardrails(concurrency=2, max_queue=2, queue_timeout=5)
    async with serve(build_app(engine, guard)) as url:
        results = await burst(url, "/sleep", 20)
    ok = [finished for status, finished, _ in results if status == 200]
    shed = [(finished, body) for status, finished, body in results if status == 503]
    assert len(ok) == 4  # two slots, two waiting in the queue
    assert len(shed) == 16
    assert len(ok) + len(shed) == len(results)  # no 500: no pool timeout reached a client
    assert all(body == {"error": "overloaded", "retry_after": 5} for _, body in shed)
    # Shed without waiting: every 503 was answered before the first query finished.
    assert max(finished for finished, _ in shed) < min(ok)
    snapshot = guard.snapshot()["limiter"]
    assert (snapshot["in_flight"], snapshot["queued"], snapshot["shed_total"]) == (0, 0, 16)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_streaming_response_holds_its_slot_over_real_http(
    async_engine_factory: Callable[..., AsyncEngine],
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.1)
    guard = gr.Guardrails(concurrency=1, max_queue=0)
    async with (
        serve(build_app(engine, guard)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        async with client.stream("GET", "/stream") as response:
            lines = response.aiter_lines()
            first = await lines.__anext__()
            assert guard.limiter.in_flight == 1  # mid-stream, the slot is still held
            second_client = await client.get("/sleep")
            rest = [line async for line in lines]
        with anyio.fail_after(5):
            while guard.limiter.in_flight:
                await anyio.sleep(0.01)
        after = await client.get("/sleep")
    assert [first, *rest] == ["row 0", "row 1", "row 2"]
    assert second_client.status_code == 503  # the only slot was streaming
    assert after.status_code == 200
    assert guard.limiter.in_flight == 0
