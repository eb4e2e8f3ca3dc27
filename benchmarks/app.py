"""The app the load benchmarks put under uvicorn: one slow query on a real pool, four ways.

``bare`` has no protection (SQLAlchemy's own pool queue, 30 s pool timeout), ``semaphore``
is the usual hand-written ``BaseHTTPMiddleware`` with an ``asyncio.Semaphore`` and a wait
timeout, ``uvicorn`` is uvicorn's own ``--limit-concurrency``, ``guardrails`` is
``GuardrailsMiddleware``. Run as a child process: it reads its config as one JSON line on
stdin, prints its port, and stops when stdin closes.

Routes: ``/query`` (``pg_sleep``), ``/login`` and ``/reports`` (the same query; for
guardrails ``critical`` and ``low`` priority), ``/trivial`` (no database), ``/stats``
(pool events, requests in the handler, breaker state, limiter, event-loop lag
samples), ``/stats/reset``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import uvicorn
from _stalls import StallLog
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

import guardrails as gr
from guardrails.tools.demo.server import serve_child

LAG_INTERVAL = 0.010
TRACE_INTERVAL = 0.1


class SemaphoreMiddleware(BaseHTTPMiddleware):
    """The usual hand-written limiter: a semaphore, a wait timeout, 503 when it runs out."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        super().__init__(app)
        self.semaphore = asyncio.Semaphore(limit)
        self.timeout = timeout

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        try:
            await asyncio.wait_for(self.semaphore.acquire(), self.timeout)
        except asyncio.TimeoutError:
            return JSONResponse(
                {"error": "overloaded"}, status_code=503, headers={"retry-after": "1"}
            )
        try:
            return await call_next(request)
        finally:
            self.semaphore.release()


class Stats:
    """Counters the benchmark reads back: pool use by breaker state, and loop lag."""

    def __init__(self) -> None:
        self.active = 0
        """Requests inside a database handler now (a reset does not forget them)."""
        self.reset()

    def reset(self) -> None:
        self.handler_calls: dict[str, int] = {}
        """Requests that reached the pool-using handler, by breaker state when they did."""
        self.checkouts: dict[str, int] = {}
        self.connects: dict[str, int] = {}
        self.holds: list[float] = []
        """Seconds each connection was checked out (checkout to checkin), newest last."""
        self.transitions: list[tuple[float, str | None, str]] = []
        """Breaker transitions as (time.monotonic(), old, new): the clock is system-wide,
        so the benchmark process can line them up with its own timestamps."""
        self.lag: list[float] = []
        """Overshoot of each 10 ms sleep of the loop-lag task, in seconds."""
        self.trace: list[tuple[float, int, int, int]] = []
        """(time.monotonic(), limit, in flight, queued) every ``TRACE_INTERVAL``."""
        self.windows: list[dict[str, Any]] = []
        """Each adaptive window's decision (``Window`` as a dict), oldest first."""

    def to_dict(
        self, guard: gr.Guardrails | None, *, lists: bool, trace: bool = False
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "handler_calls": self.handler_calls,
            "checkouts": self.checkouts,
            "connects": self.connects,
            "transitions": self.transitions,
            "active": self.active,
        }
        if lists:
            data["holds"] = self.holds[-20_000:]
            data["lag"] = self.lag
        if trace:
            data["trace"] = self.trace
            data["windows"] = self.windows
        if guard is not None:
            snapshot = guard.snapshot()
            data["breaker"] = snapshot["breaker"]["state"]
            data["limiter"] = {
                key: snapshot["limiter"].get(key)
                for key in (
                    "in_flight",
                    "queued",
                    "shed_total",
                    "shed_by_reason",
                    "early_shed_total",
                    "hold_estimate",
                    "controlled_delay",
                    "limit",
                    "configured_limit",
                    "adaptive",
                )
            }
        return data


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def build(config: dict[str, Any]) -> Any:
    """The app for one benchmark server, as ``config`` describes it."""
    variant = config["variant"]
    engine: AsyncEngine = create_async_engine(
        config["dsn"],
        pool_size=config.get("pool_size", 5),
        max_overflow=0,
        pool_timeout=config.get("pool_timeout", 30.0),
    )
    query = text("SELECT pg_sleep(:s)").bindparams(s=config.get("query_seconds", 0.05))
    if config.get("work") is not None:
        query = text("SELECT bench_work(:n)").bindparams(n=config["work"])
    stats = Stats()
    # Optional, for finding where stalls happen: GC pauses and loop lag with timestamps.
    stalls = StallLog().install() if config.get("stall_log") else None
    guard: gr.Guardrails | None = None
    if variant == "guardrails":
        probe: Callable[[], Awaitable[object]] | None = None
        if config.get("probe") == "ping":
            probe = gr.ping(engine)  # the ready probe, through the app's own pool
        elif config.get("probe"):
            plain_dsn = config["plain_dsn"]

            async def ping() -> None:
                # Straight to the server, not through the pool: a probe must not count
                # as a pool acquire while the breaker is open.
                conn = await asyncpg.connect(plain_dsn, timeout=1.0)
                try:
                    await conn.execute("SELECT 1")
                finally:
                    await conn.close()

            probe = ping
        deadline = config.get("deadline")
        policies = {
            "/login": gr.Policy(priority="critical", timeout=deadline),
            "/reports": gr.Policy(priority="low", timeout=deadline),
        }
        if config.get("stale"):
            policies["/query"] = gr.Policy(stale_ttl=600, timeout=deadline)
        # Only what the config names is passed: the rest are the library's defaults.
        limiter_settings = {
            key: config[key]
            for key in (
                "queue_timeout",
                "max_queue",
                "reserve_critical",
                "delay_interval",
                "delay_target",
                "delay_target_holds",
            )
            if key in config
        }
        guard = gr.Guardrails(
            concurrency=config.get("concurrency", 5),
            **limiter_settings,
            default_policy=gr.Policy(timeout=config.get("deadline")),
            policies=policies,
            breaker=gr.BreakerSettings(
                fail_max=config.get("fail_max", 5),
                reset_timeout=config.get("reset_timeout", 30.0),
                probe=probe,
            ),
            cache=gr.MemoryCache(max_entries=100) if config.get("stale") else None,
            # True: the library's defaults; a dict: settings for an experiment.
            adaptive=gr.AdaptiveLimit(
                **(config["adaptive"] if isinstance(config.get("adaptive"), dict) else {})
            )
            if config.get("adaptive")
            else None,
        )
        guard.watch_pool(engine)
        guard.breaker.add_listener(
            lambda old, new, _: stats.transitions.append((time.monotonic(), old, new))
        )

    def state() -> str:
        return "closed" if guard is None else guard.breaker.state

    def on_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        _bump(stats.checkouts, state())
        record.info["bench_checkout"] = time.perf_counter()

    def on_checkin(dbapi_conn: Any, record: Any) -> None:
        started = record.info.pop("bench_checkout", None)
        if started is not None:
            stats.holds.append(time.perf_counter() - started)

    event.listen(engine.sync_engine, "checkout", on_checkout)
    event.listen(engine.sync_engine, "checkin", on_checkin)
    event.listen(engine.sync_engine, "connect", lambda *_: _bump(stats.connects, state()))

    async def slow(request: Request) -> Response:
        _bump(stats.handler_calls, state())
        stats.active += 1
        try:
            async with engine.connect() as conn:
                await conn.execute(query)
        finally:
            stats.active -= 1
        return JSONResponse({"ok": True})

    @gr.policy(exempt=True)
    async def trivial(request: Request) -> Response:
        return PlainTextResponse("ok")

    @gr.policy(exempt=True)
    async def read_stats(request: Request) -> Response:
        lists = request.query_params.get("lists") != "0"
        trace = request.query_params.get("trace") == "1"
        return JSONResponse(stats.to_dict(guard, lists=lists, trace=trace))

    @gr.policy(exempt=True)
    async def reset_stats(request: Request) -> Response:
        stats.reset()
        return JSONResponse({"reset": True})

    @gr.policy(exempt=True)
    async def read_stalls(request: Request) -> Response:
        since = float(request.query_params.get("since", 0))
        return JSONResponse(stalls.to_dict(since) if stalls is not None else {})

    async def watch_loop_lag() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            stats.lag.append(loop.time() - before - LAG_INTERVAL)
            if len(stats.lag) > 100_000:  # bounded even if nobody resets it
                del stats.lag[:50_000]

    async def watch_limit(guard: gr.Guardrails) -> None:
        limiter = guard.limiter
        adaptive = limiter.adaptive
        seen = 0
        while True:
            stats.trace.append((time.monotonic(), limiter.limit, limiter.in_flight, limiter.queued))
            if adaptive is not None and adaptive.windows_total != seen and adaptive.last:
                seen = adaptive.windows_total
                # "index" shows a window this 100 ms poll missed (windows last >= 0.5 s).
                stats.windows.append({**dataclasses.asdict(adaptive.last), "index": seen})
            if len(stats.trace) > 20_000:  # bounded even if nobody resets it
                del stats.trace[:10_000]
                del stats.windows[:1_000]
            await asyncio.sleep(TRACE_INTERVAL)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Fill the pool first, so connects are not part of what is measured.
        async with AsyncExitStack() as stack:
            for _ in range(config.get("pool_size", 5)):
                conn = await stack.enter_async_context(engine.connect())
                await conn.execute(text("SELECT 1"))
        if config.get("gc") == "freeze":
            # docs/operations.md's recommendation: what startup built is never collected,
            # so a full collection no longer walks it (not a library default).
            gc.collect()
            gc.freeze()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(watch_loop_lag())]
        if guard is not None:
            tasks.append(loop.create_task(watch_limit(guard)))
        if stalls is not None:
            tasks.append(loop.create_task(stalls.watch_lag()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if guard is not None:
                await guard.aclose()
            await engine.dispose()

    middleware = []
    if variant == "guardrails":
        middleware.append(Middleware(gr.GuardrailsMiddleware, guard=guard))
    elif variant == "semaphore":
        middleware.append(
            Middleware(
                SemaphoreMiddleware,
                limit=config.get("concurrency", 5),
                timeout=config.get("queue_timeout", 1.0),
            )
        )
    elif variant not in ("bare", "uvicorn"):
        raise SystemExit(f"unknown variant {variant!r}: use bare, semaphore, uvicorn or guardrails")
    app = Starlette(
        routes=[
            Route("/query", slow),
            Route("/login", slow),
            Route("/reports", slow),
            Route("/trivial", trivial),
            Route("/stats", read_stats),
            Route("/stats/reset", reset_stats),
            Route("/stalls", read_stalls),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    if stalls is None:
        return app
    return _timed(app, stalls)


def _timed(app: Any, stalls: StallLog) -> Any:
    """Record when each request with ``?i=N`` entered the app and when its body was sent."""

    async def timed(scope: Any, receive: Any, send: Any) -> None:
        query = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if not query.startswith(b"i="):
            await app(scope, receive, send)
            return
        entered = time.monotonic()

        async def timed_send(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                stalls.requests.append((int(query[2:]), entered, time.monotonic()))
            await send(message)

        await app(scope, receive, timed_send)

    return timed


def main() -> None:
    config = json.loads(sys.stdin.readline())
    app = build(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
            backlog=8192,
            # uvicorn's own limit (--limit-concurrency): 503 beyond N connections or tasks.
            limit_concurrency=config.get("limit_concurrency"),
        )
    )
    serve_child(server)


if __name__ == "__main__":
    main()
