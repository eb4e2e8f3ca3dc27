"""The examples' degradation policies, proven with guardrails.testing as a user would.

Each example app is imported as it is (its pools on the suite's PostgreSQL) and driven
in-process; the database or the other service is made to fail with the helpers, never
by stopping anything. ``test_examples.py`` runs the same apps under uvicorn against a
healthy database, and ``test_testing_truth.py`` shows that these helpers and a stopped
server look the same to clients.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
from pgcluster import PostgresServer
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from guardrails.testing import FaultTransport, InstantRetries

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def load(module: str, database_url: str) -> ModuleType:
    """Import ``examples.<module>`` with ``DATABASE_URL`` set, as it would be run."""
    name = f"examples.{module}"
    if name in sys.modules:
        loaded = sys.modules[name]
        assert database_url == loaded.DATABASE_URL, "imported before, for another server"
        return loaded
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    before = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = database_url
    try:
        return importlib.import_module(name)
    finally:
        if before is None:
            del os.environ["DATABASE_URL"]
        else:
            os.environ["DATABASE_URL"] = before


@pytest.fixture
async def running(postgres: PostgresServer) -> AsyncIterator[Any]:
    """``running(module, driver)``: the example's app with its lifespan running, and a client."""
    apps: list[Starlette] = []

    async def start(module: str, driver: Any) -> tuple[ModuleType, httpx.AsyncClient]:
        example = load(module, postgres.dsn(driver))
        app = example.app
        context = app.router.lifespan_context(app)
        await context.__aenter__()
        apps.append(context)
        transport = httpx.ASGITransport(app=app)
        return example, httpx.AsyncClient(transport=transport, base_url="http://app")

    yield start
    for context in reversed(apps):
        await context.__aexit__(None, None, None)  # guard.aclose(), the pool disposed


async def test_starlette_dashboard_stays_up_while_the_database_is_down(
    running: Any, guardrails_outage: Any, guardrails_instant_retries: InstantRetries
) -> None:
    example, client = await running("starlette_app", "asyncpg")
    guard = example.guard
    async with client:
        live = await client.get("/dashboard")
        outage = guardrails_outage(guard)
        # The page takes its connection outside the guarded read (count_tables), so each
        # refused checkout is one outage, and the stored page answers (stale_ttl=600).
        stale = [await client.get("/dashboard") for _ in range(5)]
        opened = guard.breaker.state
        note = await client.post("/notes", content=b"while down")
        report = await client.get("/reports/monthly")
        outage.stop()
        # The breaker's probe (SELECT 1 through the watched pool) finds it back.
        with anyio.fail_after(10):
            while guard.breaker.state != "closed":
                await anyio.sleep(0.02)
        back = await client.get("/dashboard")
        health = (await client.get("/health/guardrails")).json()
    assert live.status_code == 200
    for response in stale:
        assert response.status_code == 200
        assert response.headers["x-guardrails"] == "stale"
        assert response.json() == live.json()
    assert opened == "open"  # fail_max=5
    assert outage.refused >= 5  # and the probe's tries, if one ran meanwhile
    # Writes are refused while the breaker is open (read_only_on_open), reports too.
    assert (note.status_code, note.json()["error"]) == (503, "read_only")
    assert (report.status_code, report.json()["error"]) == (503, "unavailable")
    for refused in (note, report):
        assert int(refused.headers["retry-after"]) >= 1
    assert back.status_code == 200
    assert "x-guardrails" not in back.headers
    assert health["status"] == "pass"


async def test_fastapi_item_pages_stay_up_and_checkout_waits_for_recovery(
    running: Any,
    guardrails_outage: Any,
    guardrails_clock: Any,
    guardrails_instant_retries: InstantRetries,
) -> None:
    example, client = await running("fastapi_app", "asyncpg")
    guard = example.guard
    clock = guardrails_clock(guard)
    async with client:
        live = await client.get("/api/items/7")
        outage = guardrails_outage(guard)
        stale = await client.get("/api/items/7")  # stale_ttl=300: the stored item
        never_stored = await client.get("/api/items/8")  # two more tries: fail_max reached
        checkout = await client.post("/api/items/7/checkout")
        outage.stop()
        still_open = await client.get("/api/items/8")
        clock.advance(guard.breaker.settings.probe_interval)  # the probe's turn
        with anyio.fail_after(10):
            while guard.breaker.state != "closed":  # the probe found the database back
                await anyio.sleep(0.01)
        recovered = await client.get("/api/items/8")
    assert live.json() == {"id": 7}
    assert (stale.status_code, stale.headers["x-guardrails"], stale.json()) == (
        200,
        "stale",
        {"id": 7},
    )
    assert outage.refused == 5  # three tries, then two: the breaker stops the third
    assert never_stored.status_code == 503
    # The probe tests recovery every probe_interval (1 s): that is when to come back.
    assert never_stored.json() == {"error": "unavailable", "retry_after": 1}
    assert never_stored.headers["retry-after"] == "1"
    assert (checkout.status_code, checkout.json()["error"]) == (503, "read_only")
    assert (still_open.status_code, still_open.headers["retry-after"]) == (503, "1")
    assert recovered.json() == {"id": 8}
    assert guard.breaker.state == "closed"


async def test_asyncpg_read_is_retried_then_the_breaker_spares_the_pool(
    running: Any, guardrails_outage: Any, guardrails_instant_retries: InstantRetries
) -> None:
    example, client = await running("asyncpg_app", None)
    guard = example.guard
    async with client:
        assert (await client.get("/now")).status_code == 200
        outage = guardrails_outage(guard)
        first = await client.get("/now")
        tried_first = outage.refused
        second = await client.get("/now")
        third = await client.get("/now")
    assert tried_first == 3  # Pool.acquire refused three times: the read is retried
    assert outage.refused == 5  # fail_max=5 reached on the second's second try
    # Two waits each: the second's third try found the breaker open, not the pool.
    assert len(guardrails_instant_retries.waits) == 4
    for answer in (first, second, third):
        assert answer.status_code == 503
        assert answer.json()["error"] == "unavailable"
    # Open with a probe every second: clients are told to come back then.
    assert (first.headers["retry-after"], second.headers["retry-after"]) == ("1", "1")
    assert third.headers["retry-after"] == "1"  # open: the pool was not asked at all


# -- the outbound example, its services failing ------------------------------------------


async def forecast(request: Any) -> JSONResponse:
    return JSONResponse({"forecast": "sunny", "deadline_ms": request.headers.get("x-deadline-ms")})


@pytest.fixture
def outbound_example() -> Iterator[ModuleType]:
    example = load("outbound_app", "")
    yield example
    assert example.guard.breaker.state == "closed"  # other services never touch the database


async def test_outbound_services_failing_are_answered_with_retry_after(
    outbound_example: ModuleType, guardrails_instant_retries: InstantRetries
) -> None:
    example = outbound_example
    weather_origin = httpx.ASGITransport(app=Starlette(routes=[Route("/forecast", forecast)]))
    busy = FaultTransport(weather_origin, unavailable=1.0, retry_after=None)
    down = FaultTransport(refuse=1.0)
    app = example.app
    app.state.weather = httpx.AsyncClient(
        transport=example.weather_transport(busy), base_url="http://weather.test"
    )
    app.state.partner = httpx.AsyncClient(
        transport=example.partner_transport(down), base_url="http://partner.test"
    )
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            forecasts = [await client.get("/forecast") for _ in range(3)]
            partner = [await client.get("/partner") for _ in range(3)]
    finally:
        await app.state.weather.aclose()
        await app.state.partner.aclose()
    # Weather: three tries a call (every answer a 503), the breaker open after five.
    assert [r.json()["error"] for r in forecasts] == [
        "weather_failed",
        "weather_unavailable",  # its second try was the fifth failure
        "weather_unavailable",
    ]
    assert busy.answered_unavailable == 5
    assert int(forecasts[2].headers["retry-after"]) >= 1
    # Partner: one try a call, open after two refusals, then refused at once.
    assert [r.json()["error"] for r in partner] == [
        "partner_unreachable",
        "partner_unreachable",
        "partner_unavailable",
    ]
    assert down.refused == 2
    assert (partner[2].status_code, partner[2].headers["retry-after"]) == (503, "30")
