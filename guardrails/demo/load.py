"""The open-loop load generator: a seeded arrival schedule and the client that keeps to it.

Each request is sent at its scheduled time whether or not earlier ones have answered, and
its latency counts from that scheduled time, so a slow server cannot slow the load down
and hide its own stalls (no coordinated omission).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from guardrails.demo.options import SEED_ROWS, STEADY_RATE

__all__ = ["Arrival", "Outcome", "Profile", "Progress", "drive", "schedule"]


@dataclass(frozen=True)
class Profile:
    """The load's shape: light mixed traffic all along, plus a burst on ``/dashboard``."""

    duration: float
    burst_rate: float
    steady_rate: float = STEADY_RATE

    @property
    def burst_start(self) -> float:
        """When the burst begins: after a short calm stretch that shows the baseline."""
        return min(1.0, self.duration / 10)

    @property
    def burst_end(self) -> float:
        return self.duration


@dataclass(frozen=True)
class Arrival:
    """One request and the time, in seconds from the start of the run, it is due."""

    at: float
    method: str
    path: str
    body: dict[str, Any] | None = None
    burst: bool = False


@dataclass(frozen=True)
class Outcome:
    """What became of one arrival."""

    arrival: Arrival
    status: int | None
    """HTTP status, or None when no response came (timeout, refused connection...)."""
    latency: float
    """Seconds from the scheduled send time to the end of the response (or the failure)."""
    lag: float
    """Seconds the client was late in sending: large values would mean it is the bottleneck."""
    error: str | None = None
    """Why there is no response: the exception's class name."""
    retry_after: int | None = None
    """The integer ``Retry-After`` header of a 503, when it has a valid one."""
    shed_body: bool = False
    """Whether a 503's body is ``{"error": "overloaded", "retry_after": N}`` matching the header."""


@dataclass
class Progress:
    """Live counters of a run, read by the progress line while ``drive`` updates them."""

    total: int = 0
    sent: int = 0
    done: int = 0
    started_at: float | None = None
    outcomes: list[Outcome] = field(default_factory=list)


def _poisson(rng: random.Random, rate: float, start: float, end: float) -> Iterator[float]:
    at = start + rng.expovariate(rate)
    while at < end:
        yield at
        at += rng.expovariate(rate)


def schedule(profile: Profile, seed: int) -> list[Arrival]:
    """Every request of a run, in order of due time; the same ``seed`` gives the same list."""
    # Separate streams, so a different --rate leaves the background traffic unchanged.
    steady_rng = random.Random(f"{seed}/steady")
    burst_rng = random.Random(f"{seed}/burst")
    arrivals: list[Arrival] = []
    for at in _poisson(steady_rng, profile.steady_rate, 0.0, profile.duration):
        pick = steady_rng.random()
        if pick < 0.5:
            arrivals.append(Arrival(at, "GET", f"/items/{steady_rng.randint(1, SEED_ROWS)}"))
        elif pick < 0.7:
            body = {"name": f"order {len(arrivals)}", "price_cents": steady_rng.randint(100, 9999)}
            arrivals.append(Arrival(at, "POST", "/items", body))
        else:
            arrivals.append(Arrival(at, "GET", "/dashboard"))
    for at in _poisson(burst_rng, profile.burst_rate, profile.burst_start, profile.burst_end):
        arrivals.append(Arrival(at, "GET", "/dashboard", burst=True))
    arrivals.sort(key=lambda arrival: arrival.at)
    return arrivals


async def drive(
    base_url: str,
    arrivals: list[Arrival],
    *,
    request_timeout: float,
    progress: Progress | None = None,
) -> list[Outcome]:
    """Send ``arrivals`` to ``base_url`` on schedule and return their outcomes in due order.

    ``request_timeout`` caps each request; set it above the server's worst case so that stalls
    are measured rather than cut short.
    """
    progress = progress if progress is not None else Progress()
    progress.total = len(arrivals)
    # A connection for every request that may be outstanding, since waiting for a free one
    # would delay sends and understate stalls; and none kept alive, because uvicorn closes
    # a connection after an unhandled error, and a request already sent on it would fail
    # as a client-side ReadError instead of showing the server's own answer.
    limits = httpx.Limits(max_connections=len(arrivals) + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=httpx.Timeout(request_timeout)
    ) as client:
        start = progress.started_at = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for arrival in arrivals:
                due = start + arrival.at
                await anyio.sleep_until(due)
                tg.start_soon(_send, client, arrival, due, request_timeout, progress)
    return sorted(progress.outcomes, key=lambda outcome: outcome.arrival.at)


async def _send(
    client: httpx.AsyncClient, arrival: Arrival, due: float, limit: float, progress: Progress
) -> None:
    lag = anyio.current_time() - due
    progress.sent += 1
    outcome: Outcome
    try:
        # httpx's timeout is per socket operation; this one bounds the whole exchange.
        with anyio.fail_after(limit):
            response = await client.request(arrival.method, arrival.path, json=arrival.body)
    except (httpx.HTTPError, TimeoutError) as exc:
        outcome = Outcome(arrival, None, anyio.current_time() - due, lag, type(exc).__name__)
    else:
        latency = anyio.current_time() - due
        retry_after, shed_body = (
            _shed_details(response) if response.status_code == 503 else (None, False)
        )
        outcome = Outcome(arrival, response.status_code, latency, lag, None, retry_after, shed_body)
    progress.outcomes.append(outcome)
    progress.done += 1


def _shed_details(response: httpx.Response) -> tuple[int | None, bool]:
    header = response.headers.get("retry-after", "")
    retry_after = int(header) if header.isdigit() else None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return retry_after, False
    shed_body = (
        retry_after is not None
        and isinstance(body, dict)
        and body.get("error") == "overloaded"
        and body.get("retry_after") == retry_after
    )
    return retry_after, shed_body
