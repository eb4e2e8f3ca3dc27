"""The example app the demo puts under load: Starlette on a real SQLAlchemy connection pool.

Owns the engine settings, the schema and seed data, the slow queries, the background job
and the app factory with and without guardrails. Nothing here knows about load or reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.tools.demo.options import (
    JOB_INTERVAL,
    JOB_QUERY_MS,
    MAX_QUEUE,
    POOL_SIZE,
    QUEUE_TIMEOUT,
    REPORT_QUERY_MS,
    SEED_ROWS,
    SEED_USERS,
    SLOW_QUERY_MS,
    STALE_TTL,
    password_for,
)

__all__ = ["JobStats", "create_app", "items", "make_engine", "seed", "users"]

T = TypeVar("T")

metadata = MetaData()
# Prefixed, because with --database-url the tables land in someone's real database.
items = Table(
    "guardrails_demo_items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(80), nullable=False),
    Column("price_cents", Integer, nullable=False),
)
users = Table(
    "guardrails_demo_users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(40), nullable=False, unique=True),
    Column("password_sha256", String(64), nullable=False),
)
job_runs = Table(
    "guardrails_demo_job_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("items_total", Integer, nullable=False),
)


def _digest(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


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
        # Named explicitly: the point of the demo is a real queue pool with a hard cap,
        # the app's share of the database's connections.
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
            # WAL lets writes go on while dashboards read; without it a writer waits
            # for every reader and the demo would measure SQLite locking instead.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


def _sleep_query(engine: AsyncEngine, ms: int) -> Any:
    if engine.dialect.name == "postgresql":
        return text("SELECT pg_sleep(:seconds)").bindparams(seconds=ms / 1000)
    return text("SELECT sleep_ms(:ms)").bindparams(ms=ms)


async def seed(engine: AsyncEngine) -> None:
    """Create the tables and fill them with ``SEED_ROWS`` items and ``SEED_USERS`` users."""
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
        known = set((await conn.execute(select(users.c.name))).scalars())
        missing = [f"user{i}" for i in range(1, SEED_USERS + 1) if f"user{i}" not in known]
        if missing:
            await conn.execute(
                insert(users),
                [
                    {"name": name, "password_sha256": _digest(password_for(name))}
                    for name in missing
                ],
            )


@dataclass
class JobStats:
    """What the background job did: read by the demo from ``GET /demo/stats``."""

    runs: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    """Failed rounds by what stopped them (``TimeoutError``, ``Unavailable``, ``Shed``...)."""
    max_ms: float = 0.0
    """The longest round, waits for a slot or a connection included."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "ok": self.ok,
            "failed": dict(self.failed),
            "max_ms": self.max_ms,
        }


def _unguarded(func: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
    return func


def create_app(
    engine: AsyncEngine,
    *,
    guarded: bool,
    concurrency: int = POOL_SIZE,
    queue_timeout: float = QUEUE_TIMEOUT,
    max_queue: int = MAX_QUEUE,
    job_interval: float = JOB_INTERVAL,
) -> Starlette:
    """The example app on ``engine``; with ``guarded=True`` it uses guardrails throughout.

    The app owns ``engine`` from then on: it seeds the tables at startup, runs the
    background job while it serves, and disposes the engine at shutdown. The guard,
    when there is one, is ``app.state.guard``.

    Routes: ``POST /login`` (one fast query), ``GET /dashboard`` (the slow query plus a
    small read), ``GET /reports/{name}`` (a heavier query), ``GET /items/{id}``,
    ``POST /items``, ``GET /healthz`` and ``GET /demo/stats`` (no database; the job's
    counters and ``guard.snapshot()``). The guarded app adds ``/health/guardrails``.

    Without guardrails it is plain SQLAlchemy. With them: the middleware with a slot per
    pooled connection, login in the critical lane, reports in the low lane one at a time,
    the dashboard's query through ``guard.read`` with its last good page kept in a
    ``MemoryCache`` as a stale fallback, writes through ``guard.write``, a breaker, and
    ``guard.watch_pool(engine)``.
    """
    dashboard_query = _sleep_query(engine, SLOW_QUERY_MS)
    report_query = _sleep_query(engine, REPORT_QUERY_MS)
    job_query = _sleep_query(engine, JOB_QUERY_MS)
    guard: gr.Guardrails | None = None
    if guarded:
        guard = gr.Guardrails(
            concurrency=concurrency,
            queue_timeout=queue_timeout,
            max_queue=max_queue,
            breaker=gr.BreakerSettings(fail_max=5, reset_timeout=5.0),
            cache=gr.MemoryCache(max_entries=1_000),
            policies={"/reports/{name}": gr.Policy(priority="low", max_concurrency=1)},
        )
        guard.watch_pool(engine, name="demo")
    read = guard.read if guard is not None else _unguarded
    write = guard.write if guard is not None else _unguarded
    job = JobStats()

    # Critical: signing in must work while the dashboards queue, and a single fast
    # query cannot hurt anyone.
    @gr.policy(priority="critical")
    async def login(request: Request) -> Response:
        body = await request.json()
        name, password = str(body.get("user", ""))[:40], str(body.get("password", ""))

        async def check() -> bool:
            async with engine.connect() as conn:
                query = select(users.c.password_sha256).where(users.c.name == name)
                stored = (await conn.execute(query)).scalar_one_or_none()
            return stored is not None and stored == _digest(password)

        if not await read(check)():
            return JSONResponse({"error": "wrong user or password"}, status_code=401)
        # A token in the body, not a cookie: the load's client keeps no session, so the
        # shared dashboard page stays cacheable.
        return JSONResponse({"user": name, "token": _digest(f"{name}:{time.time()}")[:32]})

    # No cache_ttl: every admitted dashboard runs its query. stale_ttl only keeps the
    # last good page for the requests guardrails will not let wait.
    @gr.policy(stale_ttl=STALE_TTL)
    async def dashboard(request: Request) -> Response:
        async def load() -> list[dict[str, Any]]:
            async with engine.connect() as conn:
                await conn.execute(dashboard_query)
                recent = await conn.execute(select(items).order_by(items.c.id.desc()).limit(5))
                return [dict(row._mapping) for row in recent]

        recent = await read(load)()
        return JSONResponse({"recent": recent, "generated_at": time.time()})

    async def report(request: Request) -> Response:
        async def build() -> dict[str, Any]:
            async with engine.connect() as conn:
                await conn.execute(report_query)
                row = (
                    await conn.execute(select(func.count(), func.sum(items.c.price_cents)))
                ).one()
            return {"items": row[0], "total_cents": row[1]}

        figures = await read(build)()
        return JSONResponse({"report": request.path_params["name"], **figures})

    async def read_item(request: Request) -> Response:
        item_id = request.path_params["item_id"]

        async def fetch() -> dict[str, Any] | None:
            async with engine.connect() as conn:
                row = (await conn.execute(select(items).where(items.c.id == item_id))).first()
            return None if row is None else dict(row._mapping)

        found = await read(fetch)()
        if found is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(found)

    async def create_item(request: Request) -> Response:
        body = await request.json()
        values = {"name": str(body["name"])[:80], "price_cents": int(body["price_cents"])}

        async def save() -> int:
            async with engine.begin() as conn:
                result = await conn.execute(insert(items).values(values).returning(items.c.id))
                new_id: int = result.scalar_one()
            return new_id

        new_id = await write(save)()
        return JSONResponse({"id": new_id, **values}, status_code=201)

    # Exempt: a load balancer's health check must get through while every slot is busy,
    # or it would pull a merely busy instance out of rotation.
    @gr.policy(exempt=True)
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @gr.policy(exempt=True)
    async def stats(request: Request) -> Response:
        snapshot = None if guard is None else _jsonable(guard.snapshot())
        return JSONResponse({"job": job.to_dict(), "guardrails": snapshot})

    async def job_round() -> None:
        async def rollup() -> int:
            async with engine.connect() as conn:
                await conn.execute(job_query)
                total: int = (
                    await conn.execute(select(func.count()).select_from(items))
                ).scalar_one()
            return total

        async def record(total: int) -> None:
            async with engine.begin() as conn:
                await conn.execute(insert(job_runs).values(items_total=total))

        if guard is None:
            await record(await rollup())
            return
        # The job's connection comes out of the same budget as the requests', so it
        # takes a slot too; critical, because the rollup must not starve behind pages.
        async with guard.limiter.slot(gr.Priority.CRITICAL):
            total = await guard.read(rollup)()
            await guard.write(record)(total)

    async def job_forever() -> None:
        while True:
            await asyncio.sleep(job_interval)
            started = time.perf_counter()
            job.runs += 1
            try:
                await job_round()
            except Exception as exc:  # the job carries on; the next round may succeed
                kind = type(exc).__name__
                job.failed[kind] = job.failed.get(kind, 0) + 1
            else:
                job.ok += 1
            job.max_ms = max(job.max_ms, (time.perf_counter() - started) * 1000)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await seed(engine)
        task = asyncio.create_task(job_forever(), name="demo-background-job")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if guard is not None:
                await guard.aclose()
            await engine.dispose()

    routes = [
        Route("/login", login, methods=["POST"]),
        Route("/dashboard", dashboard, methods=["GET"]),
        Route("/reports/{name}", report, methods=["GET"]),
        Route("/items/{item_id:int}", read_item, methods=["GET"]),
        Route("/items", create_item, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/demo/stats", stats, methods=["GET"]),
    ]
    middleware = []
    if guard is not None:
        routes.append(Route("/health/guardrails", guard.health))
        middleware.append(Middleware(gr.GuardrailsMiddleware, guard=guard))
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
