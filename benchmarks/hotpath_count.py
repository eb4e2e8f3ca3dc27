"""Instructions per request on the hot path: bare Starlette vs behind guardrails.

Timings on a shared machine are noisy; instruction counts are not. Run each case twice
under callgrind with two request counts and divide the difference, which cancels the
interpreter's start-up::

    for kind in bare guard; do for n in 500 2500; do
        valgrind --tool=callgrind --callgrind-out-file=cg.$kind.$n \\
            .venv/bin/python benchmarks/hotpath_count.py $kind $n
    done; done
    # per request: (total(2500) - total(500)) / 2000, from each file's "summary:" line

The app is a handful of routes; the request is an admitted GET (breaker closed, a free
slot), called in-process with no HTTP parsing.
"""

from __future__ import annotations

import asyncio
import sys

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

import guardrails as gr


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def main() -> None:
    kind, count = sys.argv[1], int(sys.argv[2])
    routes = [
        Route("/", hello),
        Route("/users/{user_id:int}", hello),
        Route("/items/{item_id}", hello),
        Route("/hello", hello),
    ]
    guard = [Middleware(gr.GuardrailsMiddleware, guard=gr.Guardrails(concurrency=10))]
    app = Starlette(routes=routes, middleware=[] if kind == "bare" else guard)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/hello",
        "raw_path": b"/hello",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"app"), (b"accept", b"*/*"), (b"user-agent", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    async def run() -> None:
        for _ in range(count):
            await app(dict(scope), receive, send)

    asyncio.run(run())


if __name__ == "__main__":
    main()
