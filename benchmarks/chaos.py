"""What fault injection costs when it is off: ChaosMiddleware disabled, the pool fault hook unset.

Two comparisons, each against a baseline measured in the same run, interleaved round by
round, medians compared:

- requests: bare Starlette, the same app behind a pure-ASGI middleware that does
  nothing (the floor of any middleware layer), behind ``ChaosMiddleware(enabled=False)``
  (rules configured, as a production app would carry them), and behind an enabled one
  whose rules match other routes only (the cost of looking);
- pool checkouts: SQLAlchemy's real QueuePool on SQLite, unwatched, and watched (the
  watcher's bookkeeping plus the unset ``fault`` hook); and the hook's own check, one
  attribute read and compare, timed alone against an empty loop.

The bar: disabled, injection costs under 1 us per request. Times are this process's
CPU time (``time.process_time_ns``), so time the machine gives other processes is not
counted; rounds are short and many, in alternating order, and each case is compared
with its baseline of the same round, so a noisy neighbour slows both alike. The
fastest round is shown beside the median.

    .venv/bin/python benchmarks/chaos.py [--requests 2000] [--rounds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import _harness as h
from sqlalchemy import create_engine
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from guardrails.pools import watch
from guardrails.testing import ChaosMiddleware, ChaosRule

BAR_NS = 1000.0
RULES = {
    "/reports/{name}": ChaosRule(latency=0.2, latency_rate=0.1, outcome_rate=0.01),
    "/users/{user_id:int}": ChaosRule(outcome_rate=0.05, outcome_status=500),
}


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def routes() -> list[Route]:
    return [
        Route("/", hello),
        Route("/users/{user_id:int}", hello),
        Route("/hello", hello),
        Route("/reports/{name}", hello),
    ]


def bare() -> ASGIApp:
    return Starlette(routes=routes())


class PassThrough:
    """A pure-ASGI middleware that does nothing: the floor for any middleware layer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def pass_through() -> ASGIApp:
    return Starlette(routes=routes(), middleware=[Middleware(PassThrough)])


def chaos_off() -> ASGIApp:
    chaos = Middleware(ChaosMiddleware, enabled=False, routes=RULES, seed=1)
    return Starlette(routes=routes(), middleware=[chaos])


def chaos_on_elsewhere() -> ASGIApp:
    chaos = Middleware(ChaosMiddleware, enabled=True, routes=RULES, seed=1)
    return Starlette(routes=routes(), middleware=[chaos])


APPS: dict[str, tuple[str, Callable[[], ASGIApp]]] = {
    "bare": ("bare Starlette", bare),
    "pass_through": ("a pure-ASGI middleware doing nothing", pass_through),
    "chaos_off": ("ChaosMiddleware, disabled", chaos_off),
    "chaos_on_elsewhere": ("ChaosMiddleware, enabled, no rule for this route", chaos_on_elsewhere),
}

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/hello",
    "raw_path": b"/hello",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class Sink:
    """Keeps the last status, so an app that answers wrongly is caught."""

    def __init__(self) -> None:
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]


async def per_request_ns(app: ASGIApp, requests: int) -> float:
    send = Sink()
    started = time.process_time_ns()
    for _ in range(requests):
        await app(dict(SCOPE), receive, send)
    elapsed = time.process_time_ns() - started
    if send.status != 200:
        raise SystemExit(f"answered {send.status}, expected 200")
    return elapsed / requests


async def measure_requests(requests: int, rounds: int) -> dict[str, list[float]]:
    built = {name: build() for name, (_, build) in APPS.items()}
    for app in built.values():
        await per_request_ns(app, 500)  # warm up
    samples: dict[str, list[float]] = {name: [] for name in built}
    for round_ in range(rounds):
        order = list(built.items())
        for name, app in order if round_ % 2 else reversed(order):  # drift hits both ends
            samples[name].append(await per_request_ns(app, requests))
    return samples


def per_checkout_ns(engine: Any, checkouts: int) -> float:
    connect = engine.raw_connection
    started = time.process_time_ns()
    for _ in range(checkouts):
        connect().close()
    return (time.process_time_ns() - started) / checkouts


def hook_ns(loops: int) -> tuple[float, float]:
    """Per-iteration time of the hook's check, and of the same loop without it."""
    watcher = watch(create_engine("sqlite://", poolclass=QueuePool))
    started = time.process_time_ns()
    for _ in range(loops):
        fault = watcher.fault
        if fault is not None:
            raise SystemExit("a fault is set")
    checked = time.process_time_ns() - started
    started = time.process_time_ns()
    for _ in range(loops):
        pass
    empty = time.process_time_ns() - started
    watcher.close()
    return checked / loops, empty / loops


def measure_pools(checkouts: int, rounds: int) -> dict[str, list[float]]:
    plain = create_engine("sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0)
    watched = create_engine("sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0)
    watcher = watch(watched)
    engines = {"pool_unwatched": plain, "pool_watched": watched}
    for engine in engines.values():
        per_checkout_ns(engine, 500)
    samples: dict[str, list[float]] = {name: [] for name in (*engines, "hook", "empty_loop")}
    for round_ in range(rounds):
        order = list(engines.items())
        for name, engine in order if round_ % 2 else reversed(order):
            samples[name].append(per_checkout_ns(engine, checkouts))
        checked, empty = hook_ns(checkouts * 10)
        samples["hook"].append(checked)
        samples["empty_loop"].append(empty)
    watcher.close()
    return samples


def summarize(samples: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Medians, and the median of each round's difference to the baseline of that round."""
    base = samples[baseline]
    return {
        name: {
            "median_ns": statistics.median(values),
            "delta_ns": statistics.median(v - b for v, b in zip(values, base, strict=True)),
            "ratio": statistics.median(v / b for v, b in zip(values, base, strict=True)),
            "fastest_ns": min(values),
        }
        for name, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=60, help="rounds per case")
    args = parser.parse_args()
    requests = summarize(asyncio.run(measure_requests(args.requests, args.rounds)), "bare")
    pool_samples = measure_pools(args.requests, args.rounds)
    pools = summarize(pool_samples, "pool_unwatched")
    hook = summarize(
        {"hook": pool_samples["hook"], "empty_loop": pool_samples["empty_loop"]}, "empty_loop"
    )["hook"]
    labels = {name: label for name, (label, _) in APPS.items()}
    labels |= {
        "pool_unwatched": "QueuePool checkout, unwatched",
        "pool_watched": "QueuePool checkout, watched (fault unset)",
    }
    rows = [
        [
            labels[name],
            f"{r['median_ns'] / 1000:.2f}",
            f"{r['delta_ns'] / 1000:+.3f}",
            f"{r['ratio']:.3f}x",
            f"{r['fastest_ns'] / 1000:.2f}",
        ]
        for name, r in [
            *requests.items(),
            *((n, pools[n]) for n in ("pool_unwatched", "pool_watched")),
        ]
    ]
    rows.append(
        [
            "the hook's check alone (vs an empty loop)",
            f"{hook['median_ns'] / 1000:.4f}",
            f"{hook['delta_ns'] / 1000:+.4f}",
            f"{hook['ratio']:.3f}x",
            "",
        ]
    )
    print(
        f"{args.rounds} interleaved rounds x {args.requests} requests (checkouts) per case. "
        "Delta and ratio: the median over rounds of each round's difference to (ratio of) "
        "the baseline of its group in that round: bare Starlette, the unwatched pool, "
        "the empty loop."
    )
    print(h.table(["case", "median us", "delta us", "ratio", "fastest us"], rows))
    off = requests["chaos_off"]["delta_ns"]
    floor = requests["pass_through"]["delta_ns"]
    quiet = requests["chaos_off"]["fastest_ns"] - requests["bare"]["fastest_ns"]
    verdict = "met" if off < BAR_NS and hook["delta_ns"] < BAR_NS else "MISSED"
    print(
        f"\ndisabled ChaosMiddleware: {off / 1000:+.3f} us/request (fastest rounds: "
        f"{quiet / 1000:+.3f}; a do-nothing middleware: {floor / 1000:+.3f}); "
        f"unset fault hook: {hook['delta_ns'] / 1000:+.4f} us/checkout; bar < 1 us: {verdict}"
    )
    h.save(
        "chaos",
        {"requests": requests, "pools": pools, "hook": hook, "rounds": args.rounds},
    )


if __name__ == "__main__":
    main()
