"""The guard's background work: owned by the app's lifespan, on asyncio and trio; started
lazily by the first request where nothing owns it, once per event loop."""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.breaker import Breaker


class FlakyDatabase:
    """Stands in for a database that is down until told otherwise: the probe's target."""

    def __init__(self) -> None:
        self.up = False
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1
        await anyio.lowlevel.checkpoint()
        if not self.up:
            raise ConnectionRefusedError(111, "refused")


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_with_runs_the_sampler_and_the_probe_and_stops_them(
    anyio_backend: str,
) -> None:
    database = FlakyDatabase()
    guard = gr.Guardrails(
        concurrency=2,
        # reset_timeout alone would keep it open for a minute: the probe's cadence decides.
        breaker=gr.BreakerSettings(
            fail_max=1, reset_timeout=60, probe=database.ping, probe_interval=0.02
        ),
    )
    async with guard:
        assert guard.background.started
        with anyio.fail_after(5):
            while not guard.samples:
                await anyio.sleep(0.01)
        guard.breaker.force_open(60)
        assert guard.breaker.state == "open"
        with anyio.fail_after(5):
            while database.pings < 3:
                await anyio.sleep(0.01)
        assert guard.breaker.state in ("open", "half_open")
        database.up = True
        with anyio.fail_after(5):
            while guard.breaker.state != "closed":
                await anyio.sleep(0.01)
    assert not guard.background.started
    pings, samples = database.pings, len(guard.samples)
    await anyio.sleep(0.1)
    assert (database.pings, len(guard.samples)) == (pings, samples)  # nothing runs on


def app_for(guard: gr.Guardrails, *, lifespan: bool) -> Starlette:
    async def state(request: Request) -> Response:
        return JSONResponse({"background": guard.background.started})

    return Starlette(
        routes=[Route("/", state)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
        lifespan=guard.lifespan if lifespan else None,
    )


async def get(app: Starlette) -> object:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return (await client.get("/")).json()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_lifespan_owns_the_background_work(anyio_backend: str) -> None:
    guard = gr.Guardrails(concurrency=2)
    app = app_for(guard, lifespan=True)
    async with app.router.lifespan_context(app):  # what the server runs around the app
        assert guard.background.started  # before any request
        assert await get(app) == {"background": True}
    assert not guard.background.started


def test_without_a_lifespan_each_event_loop_gets_it_started_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = gr.Guardrails(concurrency=2)
    app = app_for(guard, lifespan=False)
    with caplog.at_level(logging.DEBUG, logger="guardrails"):
        for _ in range(3):  # a new event loop each time, like a test client without `with`
            assert anyio.run(get, app) == {"background": True}
    # Each loop went away after its request, and the work with it, said in the log.
    stopped = [r for r in caplog.records if "stopped with its event loop" in r.getMessage()]
    assert len(stopped) >= 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_under_trio_without_a_lifespan_it_says_so_once_and_requests_still_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = gr.Guardrails(concurrency=2)
    app = app_for(guard, lifespan=False)

    async def three() -> list[object]:
        return [await get(app) for _ in range(3)]

    with caplog.at_level(logging.WARNING, logger="guardrails"):
        answers = anyio.run(three, backend="trio")
    assert answers == [{"background": False}] * 3
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert "lifespan=guard.lifespan" in warned[0]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_with_no_probe_running_user_requests_are_the_trials(anyio_backend: str) -> None:
    # A probe is configured, but nothing runs it (trio, no lifespan): the breaker must
    # not stay open for good; after reset_timeout one caller is the trial.
    database = FlakyDatabase()
    breaker = Breaker(gr.BreakerSettings(fail_max=1, reset_timeout=0.05, probe=database.ping))
    breaker.force_open(0.05)
    assert not breaker.probing
    with pytest.raises(gr.Unavailable):
        breaker.admit()
    await anyio.sleep(0.06)
    trial = breaker.admit()
    assert trial is not None
    breaker.record(trial)
    assert breaker.state == "closed"
    assert database.pings == 0
