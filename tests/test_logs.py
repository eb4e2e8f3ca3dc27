"""guardrails' own log lines name the exception type, the route and the pool; the driver's
text (SQL, bound parameters: user data) reaches the logs only at DEBUG."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import guardrails as gr

pytestmark = pytest.mark.anyio

EMAIL = "alice@example.com"


async def test_an_outage_is_logged_without_the_drivers_text(
    async_engine_factory: Callable[..., AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = async_engine_factory(pool_size=2)
    guard = gr.Guardrails(concurrency=2)
    guard.watch_pool(engine, name="primary")
    started = anyio.Event()

    async def lookup(request: Request) -> Response:
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            request.state.pid = pid
            started.set()
            # A query carrying user data; its connection is killed while it runs.
            await conn.execute(text("SELECT pg_sleep(5), CAST(:email AS text)"), {"email": EMAIL})
        return JSONResponse({})

    pids: list[int] = []

    async def killer() -> None:
        await started.wait()
        async with engine.connect() as conn:
            pid = (
                await conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity "
                        "WHERE query LIKE 'SELECT pg_sleep(5)%' AND pid <> pg_backend_pid()"
                    )
                )
            ).scalar()
            while pid is None:
                await anyio.sleep(0.02)
                pid = (
                    await conn.execute(
                        text(
                            "SELECT pid FROM pg_stat_activity "
                            "WHERE query LIKE 'SELECT pg_sleep(5)%' AND pid <> pg_backend_pid()"
                        )
                    )
                ).scalar()
            pids.append(pid)
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    app = Starlette(
        routes=[Route("/users/{id}", lookup)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with caplog.at_level(logging.DEBUG, logger="guardrails"):
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://app") as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(killer)
            with anyio.fail_after(20):
                response = await client.get("/users/7")
    assert pids  # the backend really was terminated
    assert response.status_code == 503
    assert EMAIL not in response.text
    answered = [r for r in caplog.records if "answered 503" in r.getMessage()]
    assert len(answered) == 1
    line = answered[0]
    assert line.levelno == logging.WARNING
    assert "/users/{id}" in line.getMessage()
    assert line.getMessage() == "GET /users/{id}: database unavailable (DBAPIError), answered 503"
    above_debug = [r for r in caplog.records if r.levelno > logging.DEBUG]
    for record in above_debug:
        assert EMAIL not in record.getMessage()
        assert record.exc_info is None  # no traceback (driver text) above DEBUG
    # The traceback is there for whoever turns DEBUG on.
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)
