"""The example app the demo puts under load: Starlette on a real SQLAlchemy connection pool.

Owns the engine settings, the schema and seed data, the slow query, and the app factory
with and without guardrails. Nothing here knows about load or reports.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.demo.options import MAX_QUEUE, POOL_SIZE, QUEUE_TIMEOUT, SEED_ROWS, SLOW_QUERY_MS

__all__ = ["create_app", "items", "make_engine", "seed"]

metadata = MetaData()
# Prefixed, because with --database-url the table lands in someone's real database.
items = Table(
    "guardrails_demo_items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(80), nullable=False),
    Column("price_cents", Integer, nullable=False),
)


def _sleep_ms(ms: int) -> int:
    # Runs in aiosqlite's worker thread: it holds the pooled connection for real while
    # the event loop stays free, exactly like a slow query on a database server.
    time.sleep(ms / 1000)
    return ms


def make_engine(url: str, *, pool_timeout: float) -> AsyncEngine:
    """An async engine on ``url`` with a real, bounded QueuePool of ``POOL_SIZE``.

    ``url`` is ``sqlite+aiosqlite:///<file>`` or ``postgresql+asyncpg://...``. On SQLite
    every new connection gets a ``sleep_ms(n)`` SQL function and WAL journaling.
    """
    engine = create_async_engine(
        url,
        # Named explicitly: the point of the demo is a real queue pool with a hard cap.
        poolclass=AsyncAdaptedQueuePool,
        pool_size=POOL_SIZE,
        max_overflow=0,
        pool_timeout=pool_timeout,
    )
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # SQLAlchemy's aiosqlite adapter passes create_function through to the
            # connection's worker thread, where queries run.
            dbapi_connection.create_function("sleep_ms", 1, _sleep_ms)
            cursor = dbapi_connection.cursor()
            # WAL lets POST /items write while dashboards read; without it a writer
            # waits for every reader and the demo would measure SQLite locking instead.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


def _slow_query(engine: AsyncEngine) -> Any:
    if engine.dialect.name == "postgresql":
        return text("SELECT pg_sleep(:seconds)").bindparams(seconds=SLOW_QUERY_MS / 1000)
    return text("SELECT sleep_ms(:ms)").bindparams(ms=SLOW_QUERY_MS)


async def seed(engine: AsyncEngine) -> None:
    """Create the items table and fill it with ``SEED_ROWS`` rows unless it has them."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        have = (await conn.execute(select(func.count()).select_from(items))).scalar_one()
        if have < SEED_ROWS:
            rng = random.Random(SEED_ROWS)
            await conn.execute(
                insert(items),
                [
                    {"name": f"item {i}", "price_cents": rng.randrange(100, 10_000)}
                    for i in range(have, SEED_ROWS)
                ],
            )


def create_app(
    engine: AsyncEngine,
    *,
    guarded: bool,
    concurrency: int = POOL_SIZE,
    queue_timeout: float = QUEUE_TIMEOUT,
    max_queue: int = MAX_QUEUE,
) -> Starlette:
    """The example app on ``engine``; with ``guarded=True`` behind GuardrailsMiddleware.

    The app owns ``engine`` from then on: it seeds the table at startup and disposes the
    engine at shutdown. The guard, when there is one, is ``app.state.guard``.

    Routes: ``GET /dashboard`` (a 150 ms query plus a small read), ``GET /items/{id}``,
    ``POST /items`` and ``GET /healthz`` (no database; in the guarded app it reports
    ``guard.snapshot()`` and is exempt from the limiter).
    """
    slow_query = _slow_query(engine)
    guard = (
        gr.Guardrails(concurrency=concurrency, queue_timeout=queue_timeout, max_queue=max_queue)
        if guarded
        else None
    )

    async def dashboard(request: Request) -> Response:
        async with engine.connect() as conn:
            await conn.execute(slow_query)
            recent = await conn.execute(select(items).order_by(items.c.id.desc()).limit(5))
            return JSONResponse({"recent": [dict(row._mapping) for row in recent]})

    async def read_item(request: Request) -> Response:
        item_id = request.path_params["item_id"]
        async with engine.connect() as conn:
            row = (await conn.execute(select(items).where(items.c.id == item_id))).first()
        if row is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(dict(row._mapping))

    async def create_item(request: Request) -> Response:
        body = await request.json()
        values = {"name": str(body["name"])[:80], "price_cents": int(body["price_cents"])}
        async with engine.begin() as conn:
            result = await conn.execute(insert(items).values(values).returning(items.c.id))
            new_id = result.scalar_one()
        return JSONResponse({"id": new_id, **values}, status_code=201)

    # Exempt: a load balancer's health check must get through while every slot is busy,
    # or it would pull a merely busy instance out of rotation.
    @gr.policy(exempt=True)
    async def healthz(request: Request) -> Response:
        if guard is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "guardrails": _jsonable(guard.snapshot())})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await seed(engine)
        try:
            yield
        finally:
            await engine.dispose()

    routes = [
        Route("/dashboard", dashboard, methods=["GET"]),
        Route("/items/{item_id:int}", read_item, methods=["GET"]),
        Route("/items", create_item, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    middleware = [] if guard is None else [Middleware(gr.GuardrailsMiddleware, guard=guard)]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.guard = guard
    return app


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot carry (enums, timedeltas...) turned into text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
