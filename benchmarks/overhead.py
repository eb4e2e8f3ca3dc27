"""Hot-path overhead: bare Starlette vs the same app behind GuardrailsMiddleware, per path.

Calls the ASGI apps in-process (no sockets, no HTTP parsing), so the ratios show what
the middleware itself costs per request: admitted, answered from the cache, shed, and
refused by an open breaker; plus a hand-written ``BaseHTTPMiddleware`` semaphore. All
apps are measured in the same run, interleaved round by round, and medians compared.

    .venv/bin/python benchmarks/overhead.py [--requests 10000] [--rounds 15] [--only admitted]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _harness as h
from app import SemaphoreMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

import guardrails as gr
from guardrails.limiter import Priority

TARGET = 1.25


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def routes() -> list[Route]:
    # A realistic handful of routes, the measured one in the middle of the table; the
    # cached variant differs only by its policy.
    cached = gr.policy(cache_ttl=3600)(_cached_hello)
    return [
        Route("/", hello),
        Route("/users/{user_id:int}", hello),
        Route("/items/{item_id}", hello),
        Route("/hello", hello),
        Route("/cached", cached),
        Route("/reports/{name}", hello, methods=["GET", "POST"]),
    ]


async def _cached_hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def bare_app() -> ASGIApp:
    return Starlette(routes=routes())


def _guarded(guard: gr.Guardrails) -> ASGIApp:
    return Starlette(routes=routes(), middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)])


def admitted_app() -> ASGIApp:
    return _guarded(gr.Guardrails(concurrency=64, queue_timeout=1.0, max_queue=64))


def cache_hit_app() -> ASGIApp:
    guard = gr.Guardrails(concurrency=64, cache=gr.MemoryCache(max_entries=1000))
    return _guarded(guard)


def shed_app() -> ASGIApp:
    # One slot, held for good, and no queue: every request is shed at once.
    guard = gr.Guardrails(concurrency=1, max_queue=0)
    held = guard.limiter.try_acquire(Priority.NORMAL)
    assert held is not None
    return _guarded(guard)


def breaker_open_app() -> ASGIApp:
    guard = gr.Guardrails(concurrency=64, breaker=gr.BreakerSettings(reset_timeout=3600))
    guard.breaker.force_open(3600)
    return _guarded(guard)


class PassThrough(BaseHTTPMiddleware):
    """``BaseHTTPMiddleware`` doing nothing: what the base class alone costs."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


def pass_through_app() -> ASGIApp:
    return Starlette(routes=routes(), middleware=[Middleware(PassThrough)])


def semaphore_app() -> ASGIApp:
    return Starlette(
        routes=routes(), middleware=[Middleware(SemaphoreMiddleware, limit=64, timeout=1.0)]
    )


@dataclass(frozen=True)
class Case:
    """One app and the request path it is measured on, with the status it must answer."""

    label: str
    build: Callable[[], ASGIApp]
    path: str
    status: int


CASES = {
    "bare": Case("bare Starlette", bare_app, "/hello", 200),
    "admitted": Case("guardrails, admitted (slot free)", admitted_app, "/hello", 200),
    "cache_hit": Case("guardrails, fresh cache hit", cache_hit_app, "/cached", 200),
    "shed": Case("guardrails, shed (no slot, no queue)", shed_app, "/hello", 503),
    "breaker_open": Case("guardrails, breaker open", breaker_open_app, "/hello", 503),
    "semaphore": Case("BaseHTTPMiddleware + Semaphore", semaphore_app, "/hello", 200),
    "base_http": Case("BaseHTTPMiddleware alone (pass-through)", pass_through_app, "/hello", 200),
}


SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/hello",
    "raw_path": b"/hello",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}


async def receive() -> Message:
    return REQUEST


class _Sink:
    """Collects the status of each response, so a case that answers wrongly is caught."""

    def __init__(self) -> None:
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]


def scope_for(path: str) -> dict[str, Any]:
    return {**SCOPE, "path": path, "raw_path": path.encode()}


async def per_request_ns(app: ASGIApp, path: str, requests: int) -> float:
    base = scope_for(path)
    send = _Sink()
    started = time.perf_counter_ns()
    for _ in range(requests):
        await app(dict(base), receive, send)
    return (time.perf_counter_ns() - started) / requests


async def measure(cases: dict[str, Case], requests: int, rounds: int) -> dict[str, list[float]]:
    built = {name: case.build() for name, case in cases.items()}
    for name, app in built.items():  # warm up: build middleware stacks, route caches, cache
        sink = _Sink()
        for _ in range(500):
            await app(scope_for(cases[name].path), receive, sink)
        if sink.status != cases[name].status:
            raise SystemExit(f"{name}: answered {sink.status}, expected {cases[name].status}")
    samples: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(rounds):
        for name, app in built.items():
            samples[name].append(await per_request_ns(app, cases[name].path, requests))
    return samples


def quiet() -> None:
    """Keep the breaker and triage messages of the shed and open cases off the output."""
    logging.getLogger("guardrails").setLevel(logging.ERROR)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=10_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per app")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=sorted(CASES),
        help="measure only these cases (bare is always measured)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every case; return (and save) medians and ratios to bare."""
    chosen = {
        name: case for name, case in CASES.items() if not args.only or name in {"bare", *args.only}
    }
    samples = asyncio.run(measure(chosen, args.requests, args.rounds))
    bare = statistics.median(samples["bare"])
    results: dict[str, Any] = {
        "requests": args.requests,
        "rounds": args.rounds,
        "target": TARGET,
        "cases": {},
    }
    for name, values in samples.items():
        median = statistics.median(values)
        results["cases"][name] = {
            "label": chosen[name].label,
            "median_us": median / 1000,
            "ratio": median / bare,
            "spread": (min(values) / bare, max(values) / bare),
        }
    h.save("overhead", results)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The overhead section of docs/benchmarks.md."""
    rows = [
        [
            case["label"],
            f"{case['median_us']:.2f}",
            f"{case['ratio']:.3f}x",
            f"{case['spread'][0]:.2f}-{case['spread'][1]:.2f}x",
        ]
        for case in results["cases"].values()
    ]
    return "\n".join(
        [
            f"In-process ASGI, {results['rounds']} interleaved rounds x "
            f"{results['requests']} requests per case, medians.",
            "",
            h.table(["case", "us/request", "ratio to bare", "rounds min-max ratio"], rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    quiet()
    results = run(parser.parse_args(argv))
    print(markdown(results))
    admitted = results["cases"].get("admitted")
    if admitted is None:
        return 0
    print(f"admitted path: {admitted['ratio']:.3f}x (target <= {TARGET}x)")
    return 0 if admitted["ratio"] <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
