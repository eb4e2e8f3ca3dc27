"""A FastAPI app calling other services through GuardedTransport: retries, breakers, health.

``upstream`` (in this module too) is a flaky weather service that fails every other
request with 503. Run it and the app in two shells::

    .venv/bin/uvicorn examples.outbound_app:upstream --port 8001
    UPSTREAM_URL=http://127.0.0.1:8001 .venv/bin/uvicorn examples.outbound_app:app

then ``curl localhost:8000/forecast`` (retried through the failures),
``curl localhost:8000/partner`` (a partner that is down: refused at once after two
tries, with Retry-After), ``curl localhost:8000/health/guardrails`` and
``curl localhost:8000/metrics``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

import guardrails as gr
from guardrails.prometheus import GuardrailsCollector, metrics_endpoint

UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8001")
PARTNER_URL = os.environ.get("PARTNER_URL", "http://127.0.0.1:8002")

guard = gr.Guardrails(
    concurrency=8,
    # A deadline per route: no outbound call or retry runs past it.
    policies={"/forecast": gr.Policy(timeout=3), "/partner": gr.Policy(timeout=2)},
)
registry = CollectorRegistry()
registry.register(GuardrailsCollector(guard))


def weather_transport(inner: httpx.AsyncBaseTransport | None = None) -> gr.GuardedTransport:
    """The weather service's policy: three tries, a breaker after five failures in a row.

    ``inner`` makes the connections (httpx's own by default; tests pass a
    ``guardrails.testing.FaultTransport``).
    """
    return gr.GuardedTransport(
        inner,
        guard=guard,
        name="weather",
        breaker=gr.BreakerSettings(fail_max=5, reset_timeout=10),
        retry=gr.RetrySettings(attempts=3),
        max_concurrency=20,
        deadline_header="x-deadline-ms",
    )


def partner_transport(inner: httpx.AsyncBaseTransport | None = None) -> gr.GuardedTransport:
    """The partner's policy: one try, and refused at once after two failures."""
    return gr.GuardedTransport(
        inner,
        guard=guard,
        name="partner",
        breaker=gr.BreakerSettings(fail_max=2, reset_timeout=30),
        retry=gr.RetrySettings(attempts=1),
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One client per service for the life of the app: its breakers and bulkheads are
    # per origin and must outlive any one request.
    async with (
        guard,  # the guard's background work runs for the app's life
        httpx.AsyncClient(
            transport=weather_transport(), base_url=UPSTREAM_URL, timeout=5
        ) as weather_client,
        httpx.AsyncClient(
            transport=partner_transport(), base_url=PARTNER_URL, timeout=1
        ) as partner_client,
    ):
        app.state.weather = weather_client
        app.state.partner = partner_client
        yield


def weather_client(request: Request) -> httpx.AsyncClient:
    """The app's one client for the weather service (a FastAPI dependency)."""
    client: httpx.AsyncClient = request.app.state.weather
    return client


def partner_client(request: Request) -> httpx.AsyncClient:
    """The app's one client for the partner service."""
    client: httpx.AsyncClient = request.app.state.partner
    return client


Weather = Annotated[httpx.AsyncClient, Depends(weather_client)]
Partner = Annotated[httpx.AsyncClient, Depends(partner_client)]

app = FastAPI(lifespan=lifespan)


@app.get("/forecast")
async def forecast(weather: Weather) -> Any:
    try:
        answer = await weather.get("/forecast")
    except gr.OriginUnavailable as exc:
        return unavailable("weather_unavailable", exc.retry_after)
    except httpx.TransportError:
        return JSONResponse({"error": "weather_unreachable"}, status_code=502)
    if answer.status_code != 200:
        return JSONResponse({"error": "weather_failed"}, status_code=502)
    return answer.json()


@app.get("/partner")
async def partner_status(partner: Partner) -> Any:
    try:
        answer = await partner.get("/status")
    except gr.OriginUnavailable as exc:
        return unavailable("partner_unavailable", exc.retry_after)
    except httpx.TransportError:
        return JSONResponse({"error": "partner_unreachable"}, status_code=502)
    return answer.json()


def unavailable(error: str, retry_after: int) -> JSONResponse:
    return JSONResponse(
        {"error": error, "retry_after": retry_after},
        status_code=503,
        headers={"Retry-After": str(retry_after)},
    )


app.router.routes.append(Route("/health/guardrails", guard.health))
app.router.routes.append(Route("/metrics", metrics_endpoint(registry)))
app.add_middleware(gr.GuardrailsMiddleware, guard=guard)


# -- the flaky upstream ---------------------------------------------------------------

_requests = itertools.count(1)


async def flaky_forecast(request: Request) -> Response:
    """Every other request fails with 503, as a struggling service might."""
    if next(_requests) % 2 == 0:
        return JSONResponse({"error": "busy"}, status_code=503)
    budget = request.headers.get("x-deadline-ms")
    return JSONResponse({"forecast": "sunny", "deadline_ms": budget})


upstream = Starlette(routes=[Route("/forecast", flaky_forecast)])
