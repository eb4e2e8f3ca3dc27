"""guardrails.testing.database: faults at the pool watchers' seam, on real pools.

Every driver's pool (real PostgreSQL) refuses with its own timeout exception; a guard
sees the refusals as it sees real pool timeouts (classifier, retries, breaker, stale
fallback, telemetry). The rate is checked over 10,000 acquires of SQLAlchemy's real
QueuePool on SQLite.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_pools
from psycopg_pool import PoolTimeout
from sqlalchemy import create_engine, text
from sqlalchemy.exc import TimeoutError as SQLAlchemyPoolTimeout
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_pools import MakePool, RecordingSink

import guardrails as gr
from guardrails.errors import ErrorKind, classify
from guardrails.pools import PoolWatcher, watch
from guardrails.testing import (
    DatabaseFault,
    InstantRetries,
    breaker_clock,
    database_down,
    flaky_database,
    slow_database,
)

make_pool = test_pools.make_pool  # the fixture: real pools of every driver

REFUSED_AS = {
    "sqlalchemy": SQLAlchemyPoolTimeout,
    "asyncpg": asyncio.TimeoutError,
    "psycopg": PoolTimeout,
}


# -- every driver, real PostgreSQL --------------------------------------------------------


@pytest.mark.anyio
async def test_a_refused_acquire_is_the_pools_own_timeout(make_pool: MakePool) -> None:
    pool = await make_pool(1)
    sink = RecordingSink()
    watcher = watch(pool.target, sink=sink)
    with database_down(watcher) as fault:
        assert watcher.fault is fault
        with pytest.raises(REFUSED_AS[pool.kind]) as caught:
            await pool.hold(0)
    # What a real pool timeout gets: an outage by provenance, counted, sent to the sink.
    assert classify(caught.value) is ErrorKind.OUTAGE
    snap = watcher.snapshot()
    assert (snap["timeouts_total"], snap["acquires_total"], snap["checked_out"]) == (1, 0, 0)
    assert sink.timeouts == [(watcher, caught.value)]
    assert (fault.acquires, fault.refused, fault.active) == (1, 1, False)
    # Off again: the real pool serves, and nothing is left on the watcher.
    assert watcher.fault is None
    await pool.hold(0)
    assert watcher.snapshot()["acquires_total"] == 1
    watcher.close()


@pytest.mark.anyio
async def test_a_slow_database_delays_each_acquire_then_serves(make_pool: MakePool) -> None:
    pool = await make_pool(1)
    watcher = watch(pool.target)
    async with slow_database(watcher, 0.05) as fault:
        for _ in range(3):
            await pool.hold(0)
    snap = watcher.snapshot()
    assert (snap["acquires_total"], snap["timeouts_total"]) == (3, 0)
    assert (fault.acquires, fault.refused) == (3, 0)
    # The wait is inside the timed acquire, as a pool's own wait would be (a lower
    # bound: a sleep never ends early).
    assert snap["acquire_wait_samples"] == 3
    assert min(snap["acquire_wait_p50_seconds"], snap["acquire_wait_max_seconds"]) >= 0.045
    watcher.close()


# -- the rate ------------------------------------------------------------------------------


def test_refusal_rate_is_within_three_sigma_over_10000_acquires() -> None:
    engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0)
    watcher = watch(engine)
    n, p = 10_000, 0.3
    refused = 0
    with flaky_database(watcher, p, seed=1234) as fault:
        for _ in range(n):
            try:
                engine.raw_connection().close()
            except SQLAlchemyPoolTimeout:
                refused += 1
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(refused - n * p) <= 3 * sigma, (refused, n * p, sigma)
    assert (fault.acquires, fault.refused) == (n, refused)
    assert watcher.snapshot()["timeouts_total"] == refused
    assert watcher.snapshot()["acquires_total"] == n - refused
    # The same seed hits the same acquires; another seed, others.
    assert _plans(watcher, p, 1234) == _plans(watcher, p, 1234)
    assert _plans(watcher, p, 1234) != _plans(watcher, p, 4321)
    watcher.close()
    engine.dispose()


def _plans(watcher: PoolWatcher, p: float, seed: int) -> list[bool]:
    fault = DatabaseFault(watcher, refuse=p, seed=seed)
    return [fault.plan(watcher)[1] for _ in range(200)]


# -- a guard sees an injected outage as a real one -----------------------------------------


@pytest.mark.anyio
async def test_a_guard_answers_the_injected_outage_like_a_real_one(
    tmp_path: Path, guardrails_instant_retries: InstantRetries
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    guard = gr.Guardrails(
        concurrency=4,
        cache=gr.MemoryCache(),
        breaker=gr.BreakerSettings(fail_max=2, reset_timeout=30),
        retry=gr.RetrySettings(attempts=2),
    )
    watcher = guard.watch_pool(engine, name="main")
    events: list[tuple[str, dict[str, Any]]] = []
    guard.telemetry.add_sink(lambda event, fields: events.append((event, fields)))

    @guard.read
    async def count() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT 41 + 1"))).scalar_one())

    @gr.policy(stale_ttl=600)
    async def dashboard(request: Request) -> Response:
        return JSONResponse({"answer": await count()})

    async def orders(request: Request) -> Response:
        async with engine.connect() as conn:  # unguarded: the pool timeout escapes the app
            await conn.execute(text("SELECT 1"))
        return JSONResponse({"orders": []})

    app = Starlette(
        routes=[Route("/dashboard", dashboard), Route("/orders", orders)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        live = await client.get("/dashboard")
        with breaker_clock(guard) as clock:
            with database_down(guard) as fault:
                # Two attempts (one retry), both refused: fail_max reached, breaker open.
                stale = await client.get("/dashboard")
                opened = guard.breaker.state
                refused_by_then = fault.refused
                while_open = await client.get("/orders")
            # The database is back; the breaker recovers the way it would, on its clock.
            still_open = await client.get("/orders")
            clock.advance(30)
            trial = await client.get("/orders")
    await engine.dispose()

    assert live.json() == {"answer": 42}
    assert "x-guardrails" not in live.headers
    assert stale.status_code == 200
    assert stale.json() == {"answer": 42}
    assert stale.headers["x-guardrails"] == "stale"
    assert opened == "open"
    assert refused_by_then == 2
    assert len(guardrails_instant_retries.waits) == 1  # the retry did not sleep
    # While open, the pool is not touched at all.
    assert fault.acquires == 2
    for refused in (while_open, still_open):
        assert refused.status_code == 503
        assert refused.json() == {"error": "unavailable", "retry_after": 30}
        assert refused.headers["retry-after"] == "30"
    assert trial.status_code == 200
    assert guard.breaker.state == "closed"
    snapshot = guard.snapshot()
    assert snapshot["pools"][0]["timeouts_total"] == 2
    assert {"kind": "stale", "route": "/dashboard", "count": 1} in snapshot["telemetry"][
        "fallbacks"
    ]
    moves = [(f["old"], f["new"]) for e, f in events if e == "breaker_state"]
    assert moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    watcher.close()


@pytest.mark.anyio
async def test_open_breaker_starts_the_outage_already_open(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    guard = gr.Guardrails(concurrency=2, breaker=gr.BreakerSettings(reset_timeout=45))
    guard.watch_pool(engine)

    async def page(request: Request) -> Response:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/page", page), Route("/save", page, methods=["POST"])],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        with database_down(guard, open_breaker=True) as fault:
            read = await client.get("/page")
            write = await client.post("/save")
    await engine.dispose()
    assert guard.breaker.state == "open"
    assert (read.status_code, read.headers["retry-after"]) == (503, "45")
    assert read.json()["error"] == "unavailable"
    assert (write.status_code, write.json()["error"]) == (503, "read_only")
    assert fault.acquires == 0
    assert guard.snapshot()["telemetry"]["breaker_transitions"] == {"open": 1}


# -- what is refused, and nesting --------------------------------------


def test_a_guard_without_a_watched_pool_has_nothing_to_fault() -> None:
    guard = gr.Guardrails(concurrency=1)
    with pytest.raises(ValueError, match=r"watches no pool.*watch_pool"):
        database_down(guard).start()
    engine = create_engine("sqlite://")
    guard.watch_pool(engine, name="main")
    with pytest.raises(ValueError, match=r"no watched pool named 'replica'.*\['main'\]"):
        database_down(guard, pools=["replica"]).start()
    with pytest.raises(TypeError, match="list of pool names"):
        database_down(guard, pools="main")
    with pytest.raises(ValueError, match="between 0 and 1"):
        flaky_database(guard, 1.5)
    with pytest.raises(ValueError, match="positive number of seconds"):
        slow_database(guard, -1)
    with pytest.raises(TypeError, match="needs the guard"):
        database_down(guard.watchers[0], open_breaker=True)
    with pytest.raises(TypeError, match="PoolWatcher"):
        database_down(engine)  # type: ignore[arg-type]
    fault = database_down(guard).start()
    with pytest.raises(RuntimeError, match="start it once"):
        fault.start()
    fault.stop()
    engine.dispose()


def test_faults_nest_and_restore_in_order() -> None:
    engine = create_engine("sqlite://", poolclass=QueuePool)
    watcher = watch(engine)
    with slow_database(watcher, 0.0) as outer:
        with database_down(watcher) as inner:
            assert watcher.fault is inner
            with pytest.raises(SQLAlchemyPoolTimeout):
                engine.raw_connection()
        assert watcher.fault is outer
        engine.raw_connection().close()
    assert watcher.fault is None
    assert (outer.acquires, inner.acquires, inner.refused) == (1, 1, 1)
    watcher.close()
    engine.dispose()
