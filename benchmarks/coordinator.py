"""Per-request cost of RedisCoordinator: the same guarded app with and without it.

Calls the ASGI apps in-process against a real redis-server (started here on a free
loopback port unless ``--redis-url`` is given). The coordinator leases slots in the
background, so an admitted request should cost what it costs with the local limiter
alone; the ratio of medians, measured in the same run and interleaved round by round,
shows it. Also reports the Redis round trips the coordinator made per request.

    .venv/bin/python benchmarks/coordinator.py [--requests 5000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

import guardrails as gr


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/hello",
    "raw_path": b"/hello",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench")],
    "client": ("127.0.0.1", 1),
    "server": ("127.0.0.1", 80),
}


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def sink(message: Message) -> None:
    if message["type"] == "http.response.start" and message["status"] != 200:
        raise RuntimeError(f"benchmark request answered {message['status']}")


def app_for(guard: gr.Guardrails | None) -> ASGIApp:
    middleware = [] if guard is None else [Middleware(gr.GuardrailsMiddleware, guard=guard)]
    return Starlette(routes=[Route("/hello", hello)], middleware=middleware)


async def per_request(app: ASGIApp, requests: int) -> float:
    """Seconds per request for ``requests`` calls in a row."""
    start = time.perf_counter()
    for _ in range(requests):
        await app(dict(SCOPE), receive, sink)
    return (time.perf_counter() - start) / requests


@contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: install it or pass --redis-url redis://127.0.0.1:6379/0")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="guardrails-bench-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def run(url: str, requests: int, rounds: int) -> int:
    local = gr.Guardrails(concurrency=64)
    coordinator = gr.RedisCoordinator(url, budget=64, name=f"bench-{time.time_ns()}")
    shared = gr.Guardrails(concurrency=64, coordinator=coordinator)
    apps = {"bare": app_for(None), "local": app_for(local), "coordinated": app_for(shared)}
    # The first request starts the coordinator; measure once it holds a lease.
    await apps["coordinated"](dict(SCOPE), receive, sink)
    deadline = time.monotonic() + 5
    while not coordinator.snapshot()["connected"]:
        if time.monotonic() > deadline:
            sys.exit(f"the coordinator did not reach Redis: {coordinator.snapshot()}")
        await asyncio.sleep(0.01)
    for app in apps.values():
        await per_request(app, requests // 10)  # warm up
    timings: dict[str, list[float]] = {name: [] for name in apps}
    calls_before = coordinator.renewals_total
    measured = 0
    for _ in range(rounds):
        for name, app in apps.items():
            timings[name].append(await per_request(app, requests))
        measured += requests
        await asyncio.sleep(0)
    calls = coordinator.renewals_total - calls_before
    median = {name: statistics.median(values) for name, values in timings.items()}
    print(f"{requests} requests x {rounds} rounds, in-process ASGI, medians per request:")
    for name, value in median.items():
        print(f"  {name:<12} {value * 1e6:8.2f} us")
    print(f"  coordinated / local: {median['coordinated'] / median['local']:.3f}x")
    print(f"  local / bare:        {median['local'] / median['bare']:.3f}x")
    print(
        f"  Redis calls by the coordinator while measuring: {calls} for {measured} "
        f"coordinated requests ({calls / measured:.5f} per request)"
    )
    print(f"  coordinator: {coordinator.snapshot()}")
    await shared.aclose()
    await local.aclose()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    with redis_server(args.redis_url) as url:
        return asyncio.run(run(url, args.requests, args.rounds))


if __name__ == "__main__":
    raise SystemExit(main())
