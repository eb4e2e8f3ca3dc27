"""gr.ping: the ready recovery probes, against a real PostgreSQL stopped and started again.

Each kind of engine or pool is put behind the middleware with ``reset_timeout=30`` and
the ready probe at the default ``probe_interval``. The database is stopped under
traffic and started again: the probe closes the breaker long before ``reset_timeout``,
and no user request ever reaches the handler while the breaker is not closed (none is
a trial). How soon it closes is measured in ``benchmarks/outage.py``, not here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from pgcluster import PostgresServer
from sqlalchemy import create_engine, event, text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import guardrails as gr

pytestmark = pytest.mark.anyio

Query = Callable[[], Awaitable[int]]
KINDS = ["sqlalchemy", "sqlalchemy_async", "asyncpg", "psycopg", "psycopg_async"]


@pytest.fixture(scope="module")
def server(pg_cluster_factory: Callable[..., PostgresServer]) -> PostgresServer:
    """A cluster of the module's own: its tests stop and start it."""
    return pg_cluster_factory(max_connections=30)


@asynccontextmanager
async def pool_of(kind: str, server: PostgresServer) -> AsyncIterator[tuple[Any, Query]]:
    """An engine or pool of ``kind`` (2 connections, 1 s timeouts) and the app's query."""
    if kind == "sqlalchemy":
        engine = create_engine(server.dsn("psycopg"), pool_size=2, pool_timeout=1)

        def select_sync() -> int:
            with engine.connect() as conn:
                return int(conn.execute(text("SELECT 1")).scalar_one())

        async def select() -> int:
            return await anyio.to_thread.run_sync(select_sync)

        try:
            yield engine, select
        finally:
            engine.dispose()
    elif kind == "sqlalchemy_async":
        async_engine = create_async_engine(server.dsn("asyncpg"), pool_size=2, pool_timeout=1)

        async def select_async() -> int:
            async with async_engine.connect() as conn:
                return int((await conn.execute(text("SELECT 1"))).scalar_one())

        try:
            yield async_engine, select_async
        finally:
            await async_engine.dispose()
    elif kind == "asyncpg":
        import asyncpg

        pool = await asyncpg.create_pool(server.dsn(), min_size=1, max_size=2)

        async def select_asyncpg() -> int:
            async with pool.acquire(timeout=1) as conn:
                return int(await conn.fetchval("SELECT 1"))

        try:
            yield pool, select_asyncpg
        finally:
            await pool.close()
    elif kind == "psycopg":
        from psycopg_pool import ConnectionPool

        sync_pool = ConnectionPool(server.dsn(), min_size=1, max_size=2, timeout=1, open=False)
        sync_pool.open(wait=True)

        def select_psycopg_sync() -> int:
            with sync_pool.connection() as conn:
                row = conn.execute("SELECT 1").fetchone()
                assert row is not None
                return int(row[0])

        async def select_psycopg() -> int:
            return await anyio.to_thread.run_sync(select_psycopg_sync)

        try:
            yield sync_pool, select_psycopg
        finally:
            sync_pool.close()
    else:
        from psycopg_pool import AsyncConnectionPool

        async_pool = AsyncConnectionPool(
            server.dsn(), min_size=1, max_size=2, timeout=1, open=False
        )
        await async_pool.open(wait=True)

        async def select_psycopg_async() -> int:
            async with async_pool.connection() as conn:
                row = await (await conn.execute("SELECT 1")).fetchone()
                assert row is not None
                return int(row[0])

        try:
            yield async_pool, select_psycopg_async
        finally:
            await async_pool.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_the_ready_probe_closes_the_breaker_after_a_restart_and_no_request_is_a_trial(
    server: PostgresServer, kind: str
) -> None:
    async with pool_of(kind, server) as (pool, select):
        probe = gr.ping(pool)
        guard = gr.Guardrails(
            concurrency=4,
            breaker=gr.BreakerSettings(fail_max=2, reset_timeout=30, probe=probe),
            retry=gr.RetrySettings(attempts=1),
        )
        assert guard.breaker.settings.probe_interval == 1.0  # the library default
        transitions: list[tuple[str | None, str]] = []
        guard.breaker.add_listener(lambda old, new, _: transitions.append((old, new)))
        entered: list[str] = []  # the breaker's state each time the handler ran

        async def item(request: Request) -> Response:
            entered.append(guard.breaker.state.value)
            return PlainTextResponse(str(await select()))

        app = Starlette(
            routes=[Route("/item", item)],
            middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
            lifespan=guard.lifespan,
        )
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://app") as client,
        ):
            assert (await client.get("/item")).text == "1"
            await anyio.to_thread.run_sync(server.stop)
            try:
                with anyio.fail_after(10):  # two outages open it
                    while guard.breaker.state != "open":
                        assert (await client.get("/item")).status_code == 503
                before = len(entered)
                for _ in range(20):  # traffic while it is down: refused, the handler idle
                    refused = await client.get("/item")
                    assert refused.json()["error"] == "unavailable"
                    await anyio.sleep(0.05)
                assert len(entered) == before
            finally:
                await anyio.to_thread.run_sync(server.start)
            with anyio.fail_after(30):  # generous: the timing is the benchmark's
                while True:
                    answer = await client.get("/item")
                    if answer.status_code == 200:
                        break
                    assert answer.json()["error"] == "unavailable"
                    await anyio.sleep(0.05)
        assert answer.text == "1"
    # The probe, not a request, was every trial: it closed the breaker, and the handler
    # never ran while the breaker was open or half-open.
    assert entered[-1] == "closed"
    assert set(entered) == {"closed"}
    assert transitions[0] == ("closed", "open")
    assert transitions[-1] == ("half_open", "closed")
    assert guard.breaker.opened_remaining() == 0
    assert repr(probe).startswith("ping(")


async def test_a_connection_the_restart_left_dead_is_replaced_within_one_probe(
    server: PostgresServer,
) -> None:
    async with pool_of("sqlalchemy_async", server) as (engine, _):
        invalidated: list[object] = []
        event.listen(engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))
        probe = gr.ping(engine)
        await probe()  # leaves one connection in the pool
        await anyio.to_thread.run_sync(server.stop)
        await anyio.to_thread.run_sync(server.start)
        await probe()  # its first query meets the dead connection; the second a fresh one
        assert len(invalidated) == 1
        await anyio.to_thread.run_sync(server.stop)
        try:
            with pytest.raises(ConnectionRefusedError) as failed:
                await probe()
            assert gr.classify(failed.value) is gr.ErrorKind.OUTAGE
        finally:
            await anyio.to_thread.run_sync(server.start)


def test_ping_takes_only_an_engine_or_a_pool() -> None:
    with pytest.raises(TypeError, match=r"gr.ping\(\) needs the engine or pool .* not str"):
        gr.ping("postgresql://app@db/app")
