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

from guardrails.tools.demo.options import (
    BURST_OFF,
    BURST_ON,
    SEED_ROWS,
    SEED_USERS,
    STEADY_RATE,
    password_for,
)

__all__ = ["SHED_REASONS", "Arrival", "Outcome", "Profile", "Progress", "drive", "schedule"]


@dataclass(frozen=True)
class Profile:
    """The light-traffic outage: a few users all along, plus bursts on ``/dashboard``.

    The few users sign in, open dashboards and reports, read and add items at
    ``steady_rate``. From ``burst_start`` on, bursts of ``burst_rate`` dashboards a
    second last ``burst_on`` seconds with ``burst_off`` seconds of calm in between:
    light traffic on average, more than the pool can take while a burst lasts.
    """

    duration: float
    burst_rate: float
    steady_rate: float = STEADY_RATE
    burst_on: float = BURST_ON
    burst_off: float = BURST_OFF

    @property
    def burst_start(self) -> float:
        """When the first burst begins: after a short calm stretch that shows the baseline."""
        return min(1.0, self.duration / 10)

    @property
    def burst_end(self) -> float:
        """When the last burst ends at the latest: the end of the run."""
        return self.duration

    def bursts(self) -> list[tuple[float, float]]:
        """The bursts' ``(start, end)`` times, in seconds from the start of the run."""
        windows: list[tuple[float, float]] = []
        start = self.burst_start
        while start < self.duration:
            windows.append((start, min(start + self.burst_on, self.duration)))
            start += self.burst_on + self.burst_off
        return windows


@dataclass(frozen=True)
class Arrival:
    """One request and the time, in seconds from the start of the run, it is due."""

    at: float
    method: str
    path: str
    body: dict[str, Any] | None = None
    burst: bool = False
    route: str = ""
    """The route's template (``/reports/{name}``), to group outcomes by route."""


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
    """Whether a 503's body is ``{"error": <reason>, "retry_after": N}`` matching the header."""
    stale: bool = False
    """A 2xx replayed from the cache (``X-Guardrails: stale``) instead of run fresh."""
    reason: str | None = None
    """A 503's ``error``: ``overloaded``, ``unavailable``, ``read_only`` or ``timeout``."""

    @property
    def kind(self) -> str:
        """The outcome in one word for charts and tables: ``ok``, ``stale``, ``503 ...``..."""
        status = self.status
        if status is None:
            return "client timeout" if self.error and "Timeout" in self.error else "no answer"
        if 200 <= status < 300:
            return "stale" if self.stale else "ok"
        if status == 503:
            return f"503 {self.reason or 'other'}"
        return str(status)


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
    # Separate streams, so a different --rate leaves the few users' traffic unchanged.
    steady_rng = random.Random(f"{seed}/steady")
    burst_rng = random.Random(f"{seed}/burst")
    arrivals: list[Arrival] = []
    for at in _poisson(steady_rng, profile.steady_rate, 0.0, profile.duration):
        pick = steady_rng.random()
        if pick < 0.2:
            user = f"user{steady_rng.randint(1, SEED_USERS)}"
            login = {"user": user, "password": password_for(user)}
            arrivals.append(Arrival(at, "POST", "/login", login, route="/login"))
        elif pick < 0.45:
            arrivals.append(Arrival(at, "GET", "/dashboard", route="/dashboard"))
        elif pick < 0.55:
            name = steady_rng.choice(("sales", "stock", "customers"))
            arrivals.append(Arrival(at, "GET", f"/reports/{name}", route="/reports/{name}"))
        elif pick < 0.8:
            item = steady_rng.randint(1, SEED_ROWS)
            arrivals.append(Arrival(at, "GET", f"/items/{item}", route="/items/{item_id}"))
        else:
            order: dict[str, Any] = {
                "name": f"order {len(arrivals)}",
                "price_cents": steady_rng.randint(100, 9999),
            }
            arrivals.append(Arrival(at, "POST", "/items", order, route="/items"))
    for start, end in profile.bursts():
        for at in _poisson(burst_rng, profile.burst_rate, start, end):
            arrivals.append(Arrival(at, "GET", "/dashboard", burst=True, route="/dashboard"))
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
        retry_after, shed_body, reason = (
            _shed_details(response) if response.status_code == 503 else (None, False, None)
        )
        stale = response.headers.get("x-guardrails") == "stale"
        outcome = Outcome(
            arrival, response.status_code, latency, lag, None, retry_after, shed_body, stale, reason
        )
    progress.outcomes.append(outcome)
    progress.done += 1


SHED_REASONS = ("overloaded", "unavailable", "read_only", "timeout")
"""The ``error`` values of the 503s guardrails answers."""


def _shed_details(response: httpx.Response) -> tuple[int | None, bool, str | None]:
    header = response.headers.get("retry-after", "")
    retry_after = int(header) if header.isdigit() else None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return retry_after, False, None
    reason = body.get("error") if isinstance(body, dict) else None
    if not isinstance(reason, str):
        return retry_after, False, None
    shed_body = (
        retry_after is not None
        and reason in SHED_REASONS
        and isinstance(body, dict)
        and body.get("retry_after") == retry_after
    )
    return retry_after, shed_body, reason
