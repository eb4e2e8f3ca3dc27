"""Pool watchers against a real PostgreSQL: counts, waits, pool timeouts, leak suspects."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import httpx
import pytest
from pgcluster import PostgresServer
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import TimeoutError as SQLAlchemyPoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import guardrails as gr
from guardrails import context
from guardrails.errors import ErrorKind, classify
from guardrails.outcome import Outcome
from guardrails.pools import NO_REQUEST, LeakSuspect, PoolWatcher, request_finished, watch

pytestmark = pytest.mark.anyio

TIMEOUT = 0.3  # pool acquire timeout of every test pool, seconds
# What each driver raises when its pool has no connection to give in time.
POOL_TIMEOUTS = (SQLAlchemyPoolTimeout, asyncio.TimeoutError, PoolTimeout)
AFTER_RESPONSE = "still checked out after the response finished"
OVER_THRESHOLD = "held longer than leak_threshold"


class RecordingSink:
    """The test's own sink: keeps what the watcher reports."""

    def __init__(self) -> None:
        self.timeouts: list[tuple[PoolWatcher, BaseException]] = []
        self.leaks: list[tuple[PoolWatcher, LeakSuspect]] = []

    def pool_timeout(self, watcher: PoolWatcher, exc: BaseException) -> None:
        self.timeouts.append((watcher, exc))

    def leak_suspect(self, watcher: PoolWatcher, info: LeakSuspect) -> None:
        self.leaks.append((watcher, info))


# -- one small harness per driver: the same operations, each driver's own API ------------


class Harness:
    """A real pool of ``size`` connections and the few operations the tests need.

    Connections from take() that a (failing) test did not give back are given back
    before the pool closes, so one failure does not spill into the next test.
    """

    kind: str
    target: Any  # what watch() is given

    def __init__(self) -> None:
        self.out: list[Any] = []

    async def hold(self, seconds: float) -> None:
        """Check a connection out, run pg_sleep(seconds) on it, give it back."""
        raise NotImplementedError

    async def take(self) -> Any:
        """Check a connection out and keep it."""
        conn = await self._take()
        self.out.append(conn)
        return conn

    async def give(self, conn: Any) -> None:
        """Give a connection from take() back."""
        self.out.remove(conn)
        await self._give(conn)

    async def aclose(self) -> None:
        for conn in self.out:
            await self._give(conn)
        await self._close()

    async def _take(self) -> Any:
        raise NotImplementedError

    async def _give(self, conn: Any) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


class SQLAlchemyAsync(Harness):
    kind = "sqlalchemy"

    def __init__(self, server: PostgresServer, size: int) -> None:
        super().__init__()
        self.engine: AsyncEngine = create_async_engine(
            server.dsn("asyncpg"), pool_size=size, max_overflow=0, pool_timeout=TIMEOUT
        )
        self.target = self.engine

    async def hold(self, seconds: float) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})

    async def _take(self) -> Any:
        return await self.engine.connect()

    async def _give(self, conn: Any) -> None:
        await conn.close()

    async def _close(self) -> None:
        await self.engine.dispose()


def _sync_hold(engine: Engine, seconds: float) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


def _sync_take(engine: Engine) -> Any:
    return engine.connect()


class SQLAlchemySync(Harness):
    """A sync Engine on psycopg, driven from worker threads."""

    kind = "sqlalchemy"

    def __init__(self, server: PostgresServer, size: int) -> None:
        super().__init__()
        self.engine = create_engine(
            server.dsn("psycopg"), pool_size=size, max_overflow=0, pool_timeout=TIMEOUT
        )
        self.target = self.engine

    async def hold(self, seconds: float) -> None:
        await anyio.to_thread.run_sync(_sync_hold, self.engine, seconds)

    async def _take(self) -> Any:
        return await anyio.to_thread.run_sync(_sync_take, self.engine)

    async def _give(self, conn: Any) -> None:
        await anyio.to_thread.run_sync(conn.close)

    async def _close(self) -> None:
        await anyio.to_thread.run_sync(self.engine.dispose)


class AsyncpgPool(Harness):
    kind = "asyncpg"

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__()
        self.pool = pool
        self.target = pool

    @classmethod
    async def create(cls, server: PostgresServer, size: int) -> AsyncpgPool:
        pool = await asyncpg.create_pool(server.dsn(), min_size=size, max_size=size)
        return cls(pool)

    async def hold(self, seconds: float) -> None:
        async with self.pool.acquire(timeout=TIMEOUT) as conn:
            await conn.execute("SELECT pg_sleep($1)", seconds)

    async def _take(self) -> Any:
        return await self.pool.acquire(timeout=TIMEOUT)

    async def _give(self, conn: Any) -> None:
        await self.pool.release(conn)

    async def _close(self) -> None:
        await self.pool.close()


class PsycopgAsyncPool(Harness):
    kind = "psycopg"

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        super().__init__()
        self.pool = pool
        self.target = pool

    @classmethod
    async def create(cls, server: PostgresServer, size: int) -> PsycopgAsyncPool:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            server.dsn(), min_size=size, max_size=size, timeout=TIMEOUT, open=False
        )
        await pool.open(wait=True)
        return cls(pool)

    async def hold(self, seconds: float) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_sleep(%s)", (seconds,))

    async def _take(self) -> Any:
        return await self.pool.getconn()

    async def _give(self, conn: Any) -> None:
        await self.pool.putconn(conn)

    async def _close(self) -> None:
        await self.pool.close()


def _psycopg_hold(pool: ConnectionPool[Any], seconds: float) -> None:
    with pool.connection() as conn:
        conn.execute("SELECT pg_sleep(%s)", (seconds,))


def _psycopg_take(pool: ConnectionPool[Any]) -> Any:
    return pool.getconn()


class PsycopgSyncPool(Harness):
    kind = "psycopg"

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        super().__init__()
        self.pool = pool
        self.target = pool

    @classmethod
    async def create(cls, server: PostgresServer, size: int) -> PsycopgSyncPool:
        def make() -> ConnectionPool[Any]:
            pool: ConnectionPool[Any] = ConnectionPool(
                server.dsn(), min_size=size, max_size=size, timeout=TIMEOUT, open=False
            )
            pool.open(wait=True)
            return pool

        return cls(await anyio.to_thread.run_sync(make))

    async def hold(self, seconds: float) -> None:
        await anyio.to_thread.run_sync(_psycopg_hold, self.pool, seconds)

    async def _take(self) -> Any:
        return await anyio.to_thread.run_sync(_psycopg_take, self.pool)

    async def _give(self, conn: Any) -> None:
        await anyio.to_thread.run_sync(self.pool.putconn, conn)

    async def _close(self) -> None:
        await anyio.to_thread.run_sync(self.pool.close)


async def _make(kind: str, server: PostgresServer, size: int) -> Harness:
    if kind == "sqlalchemy-async":
        return SQLAlchemyAsync(server, size)
    if kind == "sqlalchemy-sync":
        return SQLAlchemySync(server, size)
    if kind == "asyncpg":
        return await AsyncpgPool.create(server, size)
    if kind == "psycopg-async":
        return await PsycopgAsyncPool.create(server, size)
    return await PsycopgSyncPool.create(server, size)


MakePool = Callable[[int], Awaitable[Harness]]


@pytest.fixture(
    params=["sqlalchemy-async", "sqlalchemy-sync", "asyncpg", "psycopg-async", "psycopg-sync"]
)
async def make_pool(
    request: pytest.FixtureRequest, postgres: PostgresServer, anyio_backend: str
) -> AsyncIterator[MakePool]:
    """Make real pools of the parametrized kind; all are closed after the test."""
    made: list[Harness] = []

    async def make(size: int) -> Harness:
        harness = await _make(request.param, postgres, size)
        made.append(harness)
        return harness

    try:
        yield make
    finally:
        for harness in made:
            await harness.aclose()


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    with anyio.fail_after(within):
        while not check():
            await anyio.sleep(0.005)


# -- the behaviour, once per driver ----------------------------------------------------------


async def test_checked_out_goes_up_and_back_to_zero(make_pool: MakePool) -> None:
    pool = await make_pool(2)
    watcher = watch(pool.target, sink=RecordingSink())
    first = watcher.snapshot()
    assert (first["kind"], first["size"], first["checked_out"]) == (pool.kind, 2, 0)

    a = await pool.take()
    assert watcher.snapshot()["checked_out"] == 1
    b = await pool.take()
    assert watcher.snapshot()["checked_out"] == 2
    await pool.give(a)
    assert watcher.snapshot()["checked_out"] == 1
    await pool.give(b)
    for _ in range(3):
        await pool.hold(0)

    snap = watcher.snapshot()
    assert (snap["checked_out"], snap["acquires_total"], snap["timeouts_total"]) == (0, 5, 0)
    assert (snap["leak_suspects_total"], snap["leak_suspects"]) == (0, [])
    watcher.close()


async def test_a_real_pool_timeout_is_counted_and_sent_to_the_sink(make_pool: MakePool) -> None:
    pool = await make_pool(1)
    sink = RecordingSink()
    watcher = watch(pool.target, sink=sink)
    caught: list[BaseException] = []

    async def waiter() -> None:
        try:
            await pool.hold(0)
        except POOL_TIMEOUTS as exc:
            caught.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.hold, 1.0)
        await eventually(lambda: watcher.snapshot()["checked_out"] == 1)
        await waiter()

    assert len(caught) == 1
    assert classify(caught[0]) is ErrorKind.OUTAGE
    snap = watcher.snapshot()
    assert (snap["timeouts_total"], snap["checked_out"], snap["acquires_total"]) == (1, 0, 1)
    assert len(sink.timeouts) == 1
    seen_watcher, seen_exc = sink.timeouts[0]
    assert seen_watcher is watcher
    assert seen_exc is caught[0]
    # The timed-out acquire waited the pool timeout, and that wait is recorded too.
    assert snap["acquire_wait_samples"] == snap["acquire_wait_histogram"]["count"] == 2
    assert snap["acquire_wait_max_seconds"] >= TIMEOUT * 0.9
    watcher.close()


async def test_acquire_wait_is_measured(make_pool: MakePool) -> None:
    pool = await make_pool(1)
    watcher = watch(pool.target)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.hold, 0.2)
        await eventually(lambda: watcher.snapshot()["checked_out"] == 1)
        tg.start_soon(pool.hold, 0)
        await eventually(lambda: watcher.snapshot()["waiting"] == 1)

    snap = watcher.snapshot()
    assert snap["waiting"] == 0
    assert (snap["acquires_total"], snap["acquire_wait_samples"], snap["timeouts_total"]) == (
        2,
        2,
        0,
    )
    assert 0.15 <= snap["acquire_wait_max_seconds"] < TIMEOUT
    assert snap["acquire_wait_p95_seconds"] == snap["acquire_wait_max_seconds"]
    assert snap["acquire_wait_p50_seconds"] < 0.1  # the holder got its connection at once
    watcher.close()


async def test_connection_held_past_the_threshold_is_reported_once(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool(2)
    sink = RecordingSink()
    watcher = watch(pool.target, sink=sink, leak_threshold=0.2, name="primary")
    token = context.enter(context.CallContext("/leaky/{id}", Outcome(gr.Guardrails(concurrency=1))))
    try:
        with caplog.at_level(logging.WARNING, logger="guardrails.pools"):
            conn = await pool.take()
            await anyio.sleep(0.1)
            assert watcher.snapshot()["leak_suspects_total"] == 0
            await anyio.sleep(0.25)
            assert watcher.snapshot()["leak_suspects_total"] == 1
            await pool.hold(0)  # another checkout and checkin: no second report
            assert watcher.snapshot()["leak_suspects_total"] == 1
            await pool.give(conn)
    finally:
        context.leave(token)

    snap = watcher.snapshot()
    assert (snap["leak_suspects_total"], snap["checked_out"]) == (1, 0)
    assert len(sink.leaks) == 1
    seen_watcher, info = sink.leaks[0]
    assert seen_watcher is watcher
    assert (info.pool, info.route, info.reason) == ("primary", "/leaky/{id}", OVER_THRESHOLD)
    assert 0.2 < info.held_seconds < 1.0
    assert "test_pools.py" in info.where
    assert snap["leak_suspects"] == [info.as_dict()]
    # With a sink, reporting is the sink's job (the guard logs through its telemetry).
    assert [r for r in caplog.records if r.name == "guardrails.pools"] == []
    assert info.describe().startswith("leak suspect in pool primary: connection held longer")
    assert "/leaky/{id}" in info.describe()
    watcher.close()


async def test_held_too_long_outside_a_request_names_no_request(make_pool: MakePool) -> None:
    pool = await make_pool(1)
    sink = RecordingSink()
    watcher = watch(pool.target, sink=sink, leak_threshold=0.1)
    await pool.hold(0.2)  # returned in the end, but held past the threshold

    assert [(i.route, i.reason) for _, i in sink.leaks] == [(NO_REQUEST, OVER_THRESHOLD)]
    assert "test_pools.py" in sink.leaks[0][1].where
    assert watcher.snapshot()["leak_suspects_total"] == 1
    watcher.close()


async def test_connection_left_out_after_the_response_is_a_suspect(make_pool: MakePool) -> None:
    pool = await make_pool(2)
    sink = RecordingSink()
    watcher = watch(pool.target, sink=sink)  # default threshold: 30 s, not reached here
    ctx = context.CallContext("/items/{id}", Outcome(gr.Guardrails(concurrency=1)))
    token = context.enter(ctx)
    try:
        await pool.hold(0)  # given back properly: not a suspect
        kept = await pool.take()
    finally:
        context.leave(token)
    assert len(ctx.checkouts) == 1

    request_finished(ctx)

    assert ctx.checkouts == {}
    assert [(i.route, i.reason) for _, i in sink.leaks] == [("/items/{id}", AFTER_RESPONSE)]
    assert "test_pools.py" in sink.leaks[0][1].where
    request_finished(ctx)  # nothing left to report
    await pool.give(kept)
    snap = watcher.snapshot()
    assert (snap["leak_suspects_total"], snap["checked_out"], snap["acquires_total"]) == (1, 0, 2)
    assert len(sink.leaks) == 1
    watcher.close()


async def test_close_detaches(make_pool: MakePool) -> None:
    pool = await make_pool(1)
    sink = RecordingSink()
    watcher = watch(pool.target, sink=sink, leak_threshold=0.1)
    await pool.hold(0)
    conn = await pool.take()
    watcher.close()
    watcher.close()  # twice is fine
    await pool.give(conn)
    await pool.hold(0.15)
    async with anyio.create_task_group() as tg:  # a real timeout, unseen
        tg.start_soon(pool.hold, 0.6)
        await anyio.sleep(0.1)
        with pytest.raises(POOL_TIMEOUTS) as raised:
            await pool.hold(0)
    assert classify(raised.value) is ErrorKind.OUTAGE

    snap = watcher.snapshot()
    assert (snap["closed"], snap["acquires_total"], snap["checked_out"]) == (True, 2, 0)
    assert (snap["timeouts_total"], snap["leak_suspects_total"]) == (0, 0)
    assert sink.timeouts == []
    assert sink.leaks == []
    # Closed means unhooked: the pool can be watched afresh.
    again = watch(pool.target)
    await pool.hold(0)
    assert again.snapshot()["acquires_total"] == 1
    again.close()


async def test_snapshot_is_plain_data_without_the_dsn(
    make_pool: MakePool, postgres: PostgresServer
) -> None:
    pool = await make_pool(1)
    watcher = watch(pool.target, leak_threshold=0.05)
    await pool.hold(0.1)
    snap = watcher.snapshot()
    text_of = repr(snap) + repr(watcher)
    for secret in (postgres.dsn(), f"{postgres.host}:{postgres.port}", str(postgres.port)):
        assert secret not in text_of
    assert "postgresql://" not in text_of
    assert all(isinstance(v, str | int | float | bool | list | dict | None) for v in snap.values())
    watcher.close()


async def test_a_pool_is_watched_once(make_pool: MakePool) -> None:
    pool = await make_pool(1)
    watcher = watch(pool.target)
    with pytest.raises(ValueError, match="already watched"):
        watch(pool.target)
    watcher.close()


# -- driver specifics -------------------------------------------------------------------------


async def test_sqlalchemy_engine_stays_watched_across_dispose(postgres: PostgresServer) -> None:
    engine = create_async_engine(
        postgres.dsn("asyncpg"), pool_size=1, max_overflow=0, pool_timeout=TIMEOUT
    )
    try:
        watcher = watch(engine)
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        await engine.dispose()
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        snap = watcher.snapshot()
        assert (snap["acquires_total"], snap["acquire_wait_samples"], snap["checked_out"]) == (
            2,
            2,
            0,
        )
        assert (snap["connects_total"], snap["closes_total"]) == (2, 1)
        assert snap["name"] == "sqlalchemy:postgresql+asyncpg"
        watcher.close()
        pool = engine.sync_engine.pool
        assert "connect" not in vars(pool)
        assert list(pool.dispatch.checkout) == list(pool.dispatch.checkin) == []
    finally:
        await engine.dispose()


async def test_asyncpg_pool_keeps_its_type_and_methods(postgres: PostgresServer) -> None:
    pool = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=1)
    try:
        watcher = watch(pool)
        assert isinstance(pool, asyncpg.Pool)
        assert await pool.fetchval("SELECT 41 + 1") == 42  # Pool.fetchval acquires too
        assert watcher.snapshot()["acquires_total"] == 1
        watcher.close()
        assert type(pool) is asyncpg.Pool
    finally:
        await pool.close()


async def test_route_of_a_leaking_endpoint_through_the_middleware(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_async_engine(postgres.dsn("asyncpg"), pool_size=2, max_overflow=0)
    kept: list[Any] = []

    async def leaky(request: Request) -> JSONResponse:
        conn = await engine.connect()
        kept.append(conn)
        # The error path skips the close: the classic leak.
        await conn.execute(text("SELECT 1 / 0"))
        await conn.close()
        return JSONResponse({"ok": True})

    guard = gr.Guardrails(concurrency=2)
    watcher = guard.watch_pool(engine)
    app = Starlette(routes=[Route("/leaky/{id}", leaky)])
    app.add_middleware(gr.GuardrailsMiddleware, guard=guard)
    try:
        with caplog.at_level(logging.WARNING, logger="guardrails"):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                response = await client.get("/leaky/7")
        assert response.status_code == 500  # the app's own error: not an outage
        assert guard.breaker.snapshot()["failures"] == 0
        snap = watcher.snapshot()
        assert (snap["leak_suspects_total"], snap["checked_out"]) == (1, 1)
        assert snap["leak_suspects"][0]["route"] == "/leaky/{id}"
        assert snap["leak_suspects"][0]["reason"] == AFTER_RESPONSE
        messages = [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("leak suspect")
        ]
        assert len(messages) == 1
        assert "/leaky/{id}" in messages[0]
        assert "test_pools.py" in messages[0]
    finally:
        for conn in kept:
            await conn.close()
        watcher.close()
        await guard.aclose()
        await engine.dispose()


# -- no database -------------------------------------------------------------------------------


def test_unsupported_objects_are_refused_with_the_supported_types() -> None:
    with pytest.raises(TypeError, match=r"cannot watch dict: supported pools are .*asyncpg\.Pool"):
        watch({})


@pytest.mark.parametrize("threshold", [0, -1.0, True, "30"])
def test_bad_leak_thresholds_are_refused(threshold: Any) -> None:
    with pytest.raises(ValueError, match="leak_threshold must be a positive number"):
        watch(object(), leak_threshold=threshold)


def test_a_url_is_refused_as_a_name() -> None:
    engine = create_engine("postgresql+psycopg://user:secret@db.example/app")
    try:
        with pytest.raises(ValueError, match="must not be a connection URL"):
            watch(engine, name="postgresql://user:secret@db.example/app")
        watcher = watch(engine)
        assert watcher.name == "sqlalchemy:postgresql+psycopg"
        watcher.close()
    finally:
        engine.dispose()


def test_importing_the_package_imports_no_driver() -> None:
    code = (
        "import sys, guardrails.pools; "
        "print(sorted(m for m in ('sqlalchemy', 'asyncpg', 'psycopg', 'psycopg_pool') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
