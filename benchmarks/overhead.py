"""Hot-path overhead: bare Starlette vs the same app behind GuardrailsMiddleware.

Calls the ASGI apps in-process (no sockets, no HTTP parsing), so the ratio shows
what the middleware itself costs per admitted request. Both apps are measured in
the same run, interleaved round by round, and the medians are compared.

    .venv/bin/python benchmarks/overhead.py [--requests 20000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

import guardrails as gr

TARGET = 1.25


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def routes() -> list[Route]:
    # A realistic handful of routes, the measured one in the middle of the table.
    return [
        Route("/", hello),
        Route("/users/{user_id:int}", hello),
        Route("/items/{item_id}", hello),
        Route("/hello", hello),
        Route("/reports/{name}", hello, methods=["GET", "POST"]),
    ]


def bare_app() -> ASGIApp:
    return Starlette(routes=routes())


def guarded_app() -> ASGIApp:
    guard = gr.Guardrails(concurrency=64, queue_timeout=1.0, max_queue=64)
    return Starlette(routes=routes(), middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)])


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


async def send(message: Message) -> None:
    return None


async def per_request_ns(app: ASGIApp, requests: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(requests):
        await app(dict(SCOPE), receive, send)
    return (time.perf_counter_ns() - started) / requests


async def measure(requests: int, rounds: int) -> dict[str, list[float]]:
    apps: dict[str, Callable[[], ASGIApp]] = {"bare": bare_app, "guardrails": guarded_app}
    built = {name: factory() for name, factory in apps.items()}
    for app in built.values():  # warm up: build middleware stacks, route caches
        await per_request_ns(app, 500)
    samples: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(rounds):
        for name, app in built.items():
            samples[name].append(await per_request_ns(app, requests))
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per app")
    args = parser.parse_args(argv)
    samples = asyncio.run(measure(args.requests, args.rounds))
    bare = statistics.median(samples["bare"])
    guarded = statistics.median(samples["guardrails"])
    ratio = guarded / bare
    print(f"in-process ASGI, {args.rounds} rounds x {args.requests} requests, medians:")
    print(f"  bare Starlette             {bare / 1000:8.2f} us/request")
    print(f"  + GuardrailsMiddleware     {guarded / 1000:8.2f} us/request")
    print(f"  ratio                      {ratio:8.3f}x   (target <= {TARGET}x)")
    print(f"  added per request          {(guarded - bare) / 1000:8.2f} us")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
