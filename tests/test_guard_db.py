"""guard.read / guard.write and the breaker against a real PostgreSQL and a real pool.

Every pool timeout here comes from a pool exhausted by a connection running pg_sleep;
every connection failure from a server that was really stopped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy.exc
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import guardrails as gr

pytestmark = pytest.mark.anyio

EngineFactory = Callable[..., AsyncEngine]


def count_checkouts(engine: AsyncEngine) -> list[int]:
    """A one-item list holding how many times the pool handed out a connection."""
    counter = [0]

    def on_checkout(*_: Any) -> None:
        counter[0] += 1

    event.listen(engine.sync_engine.pool, "checkout", on_checkout)
    return counter


@asynccontextmanager
async def pool_held(engine: AsyncEngine, seconds: float) -> AsyncIterator[None]:
    """Hold one pooled connection in ``pg_sleep(seconds)`` while the block runs."""
    started = anyio.Event()

    async def hold() -> None:
        async with engine.connect() as conn:
            started.set()
            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await started.wait()
        await anyio.sleep(0.02)  # the query is on the wire
        yield


async def select_one(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT 1"))).scalar_one())


async def test_pool_timeouts_open_the_breaker_and_nothing_touches_the_pool_while_open(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.1)
    checkouts = count_checkouts(engine)
    guard = gr.Guardrails(
        concurrency=10,
        breaker=gr.BreakerSettings(fail_max=3, reset_timeout=0.6),
        retry=gr.RetrySettings(attempts=1),
    )
    entered = 0

    @guard.read
    async def read_one() -> int:
        nonlocal entered
        entered += 1
        return await select_one(engine)

    async with pool_held(engine, 0.8):
        for _ in range(3):
            with pytest.raises(gr.Unavailable) as refused:
                await read_one()
            assert isinstance(refused.value.__cause__, sqlalchemy.exc.TimeoutError)
        assert guard.breaker.state == "open"
        assert guard.snapshot()["status"] == "fail"
        before = (entered, checkouts[0])
        for _ in range(20):
            with pytest.raises(gr.Unavailable) as refused:
                await read_one()
            assert refused.value.retry_after == 1
        assert (entered, checkouts[0]) == before  # not called, no acquire
    # The holder has let go; once reset_timeout is over one trial closes the breaker.
    with anyio.fail_after(5):
        while guard.breaker.opened_remaining() > 0:
            await anyio.sleep(0.02)
    assert await read_one() == 1
    snapshot = guard.snapshot()["breaker"]
    assert (snapshot["state"], snapshot["failures"], snapshot["transitions"]) == ("closed", 0, 3)


async def test_a_stopped_server_opens_it_and_the_probe_closes_it_when_the_server_returns(
    pg_cluster_factory: Callable[..., Any], async_engine_factory: EngineFactory
) -> None:
    server = pg_cluster_factory(max_connections=20)
    engine = async_engine_factory(server=server, pool_size=2, pool_timeout=1)
    probes = 0

    async def ping() -> None:
        nonlocal probes
        probes += 1
        await select_one(engine)

    guard = gr.Guardrails(
        concurrency=4,
        # The probe tests recovery on its own cadence, whatever reset_timeout says.
        breaker=gr.BreakerSettings(
            fail_max=2, reset_timeout=30, probe=ping, probe_timeout=1, probe_interval=0.1
        ),
        retry=gr.RetrySettings(attempts=1),
    )
    read_one = guard.read(select_one)
    assert await read_one(engine) == 1

    await anyio.to_thread.run_sync(server.stop)
    for _ in range(2):
        with pytest.raises(gr.Unavailable):
            await read_one(engine)
    assert guard.breaker.state == "open"
    with anyio.fail_after(5):  # probes run and fail while the server is down
        while probes < 2:
            await anyio.sleep(0.02)
    assert guard.breaker.state in ("open", "half_open")
    failed_probes = probes

    await anyio.to_thread.run_sync(server.start)
    with anyio.fail_after(5):
        while guard.breaker.state != "closed":
            await anyio.sleep(0.02)
    assert probes > failed_probes
    assert await read_one(engine) == 1
    await guard.aclose()


async def test_the_apps_own_errors_never_open_it(async_engine_factory: EngineFactory) -> None:
    engine = async_engine_factory()
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS guard_unique"))
        await conn.execute(text("CREATE TABLE guard_unique (id int PRIMARY KEY)"))
        await conn.execute(text("INSERT INTO guard_unique VALUES (1)"))
    guard = gr.Guardrails(concurrency=4, breaker=gr.BreakerSettings(fail_max=2))
    calls = 0

    @guard.write
    async def insert_duplicate() -> None:
        nonlocal calls
        calls += 1
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO guard_unique VALUES (1)"))

    for _ in range(10):
        with pytest.raises(sqlalchemy.exc.IntegrityError):  # unchanged, not Unavailable
            await insert_duplicate()
    assert calls == 10
    snapshot = guard.snapshot()["breaker"]
    assert (snapshot["state"], snapshot["failures"]) == ("closed", 0)


async def test_a_read_retries_through_a_brief_exhaustion_and_a_write_runs_once(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.1)
    guard = gr.Guardrails(
        concurrency=4,
        breaker=gr.BreakerSettings(fail_max=20),
        retry=gr.RetrySettings(attempts=8, base_delay=0.1, max_delay=0.2),
    )
    reads = writes = 0

    @guard.read
    async def read_one() -> int:
        nonlocal reads
        reads += 1
        return await select_one(engine)

    @guard.write
    async def write_one() -> int:
        nonlocal writes
        writes += 1
        return await select_one(engine)

    async with pool_held(engine, 0.35):
        with pytest.raises(gr.Unavailable) as refused:
            await write_one()
        assert isinstance(refused.value.__cause__, sqlalchemy.exc.TimeoutError)
        assert await read_one() == 1
    assert writes == 1
    assert reads >= 2
    retry = guard.snapshot()["retry"]
    assert retry["retries_total"] == reads - 1
    assert guard.breaker.state == "closed"


async def test_under_a_full_outage_attempts_stay_within_the_retry_budget(
    pg_cluster_factory: Callable[..., Any], async_engine_factory: EngineFactory
) -> None:
    server = pg_cluster_factory(max_connections=20)
    engine = async_engine_factory(server=server, pool_size=2, pool_timeout=1)
    settings = gr.RetrySettings(
        attempts=4, base_delay=0.001, max_delay=0.002, budget_ratio=0.1, budget_min_retries=2
    )
    guard = gr.Guardrails(
        concurrency=4, breaker=gr.BreakerSettings(fail_max=10_000), retry=settings
    )
    attempts = 0

    @guard.read
    async def read_one() -> int:
        nonlocal attempts
        attempts += 1
        return await select_one(engine)

    await anyio.to_thread.run_sync(server.stop)
    calls = 40
    for _ in range(calls):
        with pytest.raises(gr.Unavailable):
            await read_one()
    assert calls < attempts <= calls + 2 + int(calls * 0.1)
    assert guard.snapshot()["retry"]["denied_total"] > 0


async def test_middleware_turns_unwrapped_pool_timeouts_into_503_and_opens_the_breaker(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.1)
    checkouts = count_checkouts(engine)
    guard = gr.Guardrails(concurrency=10, breaker=gr.BreakerSettings(fail_max=3, reset_timeout=30))
    handled = 0

    async def rows(request: Request) -> Response:  # no guard.read: the middleware alone
        nonlocal handled
        handled += 1
        return PlainTextResponse(str(await select_one(engine)))

    @gr.policy(exempt=True)
    async def health(request: Request) -> Response:
        return JSONResponse(guard.snapshot()["breaker"])

    app = Starlette(
        routes=[Route("/rows", rows), Route("/health", health)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://app") as client,
        pool_held(engine, 1.0),
    ):
        answers = [await client.get("/rows") for _ in range(3)]
        assert guard.breaker.state == "open"
        before = (handled, checkouts[0])
        fast = [await client.get("/rows") for _ in range(10)]
        assert (handled, checkouts[0]) == before
        health_answer = await client.get("/health")
    for response in answers + fast:
        assert response.status_code == 503
        assert response.json()["error"] == "unavailable"
        retry_after = int(response.headers["retry-after"])
        assert response.json() == {"error": "unavailable", "retry_after": retry_after}
        assert retry_after in range(1, 31)
        assert "Traceback" not in response.text
        assert "QueuePool" not in response.text
    assert health_answer.status_code == 200
    assert health_answer.json()["state"] == "open"
    assert guard.limiter.in_flight == 0


async def test_half_open_lets_one_request_try_and_refuses_the_rest_and_low_priority(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.2)
    guard = gr.Guardrails(
        concurrency=10,
        breaker=gr.BreakerSettings(fail_max=2, reset_timeout=0.3),
        policies={"/report": gr.Policy(priority="low")},
    )
    handled: list[str] = []

    async def rows(request: Request) -> Response:
        handled.append(request.url.path)
        return PlainTextResponse(str(await select_one(engine)))

    app = Starlette(
        routes=[Route("/rows", rows), Route("/report", rows)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        async with pool_held(engine, 2.0):
            assert [(await client.get("/rows")).status_code for _ in range(2)] == [503, 503]
            assert guard.breaker.state == "open"
            await anyio.sleep(0.3)
            handled.clear()
            statuses: dict[str, int] = {}

            async def get(name: str, path: str) -> None:
                statuses[name] = (await client.get(path)).status_code

            async with anyio.create_task_group() as tg:
                tg.start_soon(get, "trial", "/rows")
                await anyio.sleep(0.05)  # the trial is waiting for the held pool
                assert guard.breaker.state == "half_open"
                tg.start_soon(get, "second", "/rows")
                tg.start_soon(get, "report", "/report")
            # Only the trial reached the handler; it timed out, so the breaker re-opened.
            assert handled == ["/rows"]
            assert statuses == {"trial": 503, "second": 503, "report": 503}
            assert guard.breaker.state == "open"
        await anyio.sleep(0.3)
        assert (await client.get("/report")).status_code == 503  # low never is the trial
        assert (await client.get("/rows")).status_code == 200
        assert guard.breaker.state == "closed"
        assert (await client.get("/report")).status_code == 200
    assert guard.limiter.in_flight == 0


async def test_a_request_past_its_deadline_gets_503_and_gives_everything_back(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=5)
    guard = gr.Guardrails(
        concurrency=2,
        retry=gr.RetrySettings(attempts=5, base_delay=0.5, max_delay=1.0),
        policies={"/slow": gr.Policy(timeout=0.3)},
    )

    async def slow(request: Request) -> Response:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(5)"))
        return PlainTextResponse("too late")

    app = Starlette(
        routes=[Route("/slow", slow)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        started = anyio.current_time()
        response = await client.get("/slow")
        took = anyio.current_time() - started
    assert response.status_code == 503
    assert response.json() == {"error": "timeout", "retry_after": 1}
    assert took < 1.0  # the 5 s query was cut off at the 0.3 s deadline
    assert guard.limiter.in_flight == 0
    with anyio.fail_after(5):  # the cancelled query's connection comes back to the pool
        while engine.pool.checkedout():  # type: ignore[attr-defined]
            await anyio.sleep(0.02)
    assert guard.breaker.snapshot()["failures"] == 0
    assert await select_one(engine) == 1


async def test_read_retries_stop_at_the_request_deadline(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.05)
    guard = gr.Guardrails(
        concurrency=2,
        breaker=gr.BreakerSettings(fail_max=100),
        retry=gr.RetrySettings(attempts=50, base_delay=0.05, max_delay=0.1),
        policies={"/rows": gr.Policy(timeout=0.5)},
    )
    attempts = 0

    @guard.read
    async def read_one() -> int:
        nonlocal attempts
        attempts += 1
        return await select_one(engine)

    async def rows(request: Request) -> Response:
        return PlainTextResponse(str(await read_one()))

    app = Starlette(
        routes=[Route("/rows", rows)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://app") as client,
        pool_held(engine, 1.5),
    ):
        started = anyio.current_time()
        response = await client.get("/rows")
        took = anyio.current_time() - started
    assert response.status_code == 503
    assert response.json()["error"] in ("unavailable", "timeout")
    assert took < 0.5 + 0.2
    assert 2 <= attempts < 50


def breaker_app(guard: gr.Guardrails, engine: AsyncEngine) -> Starlette:
    """Routes that reach the database in different ways, behind the middleware."""

    @guard.read
    async def read_one() -> int:
        return await select_one(engine)

    async def rows(request: Request) -> Response:
        return PlainTextResponse(str(await select_one(engine)))

    async def guarded_then_raw(request: Request) -> Response:
        # A guarded read succeeds; then, holding the pool's only connection, a raw
        # query asks for a second one and times out.
        await read_one()
        async with engine.connect():
            return PlainTextResponse(str(await select_one(engine)))

    async def handles_its_own(request: Request) -> Response:
        try:
            return PlainTextResponse(str(await select_one(engine)))
        except sqlalchemy.exc.TimeoutError:
            return PlainTextResponse("sorry", status_code=500)

    async def no_database(request: Request) -> Response:
        return PlainTextResponse("static")

    async def converts_the_outage(request: Request) -> Response:
        try:
            await read_one()
        except gr.Unavailable as exc:
            # Not chained (an ``except``/``raise`` of one's own): the outage still counts.
            raise RuntimeError(f"could not load the page, retry in {exc.retry_after} s")  # noqa: B904
        return PlainTextResponse("loaded")

    return Starlette(
        routes=[
            Route("/rows", rows),
            Route("/guarded-then-raw", guarded_then_raw),
            Route("/handles-its-own", handles_its_own),
            Route("/static", no_database),
            Route("/converts-the-outage", converts_the_outage),
        ],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )


async def test_a_request_that_never_reached_the_database_cannot_close_the_breaker(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.1)
    guard = gr.Guardrails(concurrency=4, breaker=gr.BreakerSettings(fail_max=2, reset_timeout=0.2))
    guard.watch_pool(engine)
    app = breaker_app(guard, engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        async with pool_held(engine, 0.6):
            assert [(await client.get("/rows")).status_code for _ in range(2)] == [503, 503]
        assert guard.breaker.state == "open"
        await anyio.sleep(0.25)
        # A 404 and a page that needs no connection take the trial and give it back.
        assert (await client.get("/favicon.ico")).status_code == 404
        assert (await client.get("/static")).status_code == 200
        assert guard.breaker.state == "half_open"
        assert guard.snapshot()["breaker"]["transitions"] == 2  # opened, then half-open
        # A request that really gets a connection is the trial that closes it.
        assert (await client.get("/rows")).status_code == 200
        assert guard.breaker.state == "closed"
    assert guard.limiter.in_flight == 0


async def test_outages_inside_a_request_count_once_each_even_when_the_app_handles_them(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.1)
    guard = gr.Guardrails(
        concurrency=4,
        breaker=gr.BreakerSettings(fail_max=4, reset_timeout=30),
        retry=gr.RetrySettings(attempts=1),
    )
    guard.watch_pool(engine)
    app = breaker_app(guard, engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        # A guarded read succeeds, then a raw query finds the pool exhausted: the read's
        # success does not hide the outage, and the outage counts once, not twice. (The
        # read's success proves the database answered: consecutive failures restart.)
        for _ in range(2):
            assert (await client.get("/guarded-then-raw")).status_code == 503
            assert guard.snapshot()["breaker"]["failures"] == 1
        async with pool_held(engine, 1.0):
            # The app catches the pool timeout and answers itself: still an outage.
            own = [await client.get("/handles-its-own") for _ in range(2)]
            assert [a.text for a in own] == ["sorry", "sorry"]
            assert guard.snapshot()["breaker"]["failures"] == 3
            raw = await client.get("/rows")
        assert raw.status_code == 503
        assert guard.breaker.state == "open"
        assert guard.snapshot()["pools"][0]["timeouts_total"] == 5
    assert guard.limiter.in_flight == 0


async def test_an_app_error_after_an_outage_does_not_count_as_the_database_answering(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.1)
    guard = gr.Guardrails(
        concurrency=4,
        breaker=gr.BreakerSettings(fail_max=3, reset_timeout=30),
        retry=gr.RetrySettings(attempts=1),
    )
    app = breaker_app(guard, engine)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://app") as client,
        pool_held(engine, 1.0),
    ):
        statuses = [(await client.get("/converts-the-outage")).status_code for _ in range(3)]
        # The handler turned each outage into its own error: the outages still count.
        assert statuses == [500, 500, 500]
        assert guard.breaker.state == "open"
        refused = await client.get("/converts-the-outage")
    assert refused.status_code == 503
    assert guard.limiter.in_flight == 0


async def test_trials_that_run_where_no_watcher_sees_close_the_breaker_at_the_third(
    async_engine_factory: EngineFactory,
) -> None:
    watched = async_engine_factory(pool_size=1)
    elsewhere = async_engine_factory(pool_size=1)  # e.g. a replica's pool, not watched
    guard = gr.Guardrails(concurrency=4, breaker=gr.BreakerSettings(reset_timeout=30))
    guard.watch_pool(watched)

    async def replica_rows(request: Request) -> Response:
        return PlainTextResponse(str(await select_one(elsewhere)))

    app = Starlette(
        routes=[Route("/replica", replica_rows)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    states = []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        guard.breaker.force_open(0)  # the open period is over: requests are trials
        for _ in range(3):
            assert (await client.get("/replica")).status_code == 200
            states.append(guard.breaker.state)
    assert states == ["half_open", "half_open", "closed"]
    assert guard.limiter.in_flight == 0
