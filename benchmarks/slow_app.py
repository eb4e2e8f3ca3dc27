"""The app the slow-client benchmark serves: guardrails defaults, 10 slots, 50 ms holds
of a connection from a watched SQLite pool (SQLAlchemy's real QueuePool), as the docs set
an app up.

Run by ``benchmarks/slowclients.py`` as ``uvicorn slow_app:app`` in a child process, so
that the code under test (``PYTHONPATH``) is the only thing that differs between runs.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import guardrails as gr

HOLD = 0.05
CHUNK = b"x" * (1 << 16)
PAGE = b"x" * (8 << 20)

guard = gr.Guardrails(concurrency=10)
_database = os.path.join(tempfile.mkdtemp(prefix="guardrails-slow-"), "bench.sqlite")
engine = create_async_engine(
    f"sqlite+aiosqlite:///{_database}",
    poolclass=AsyncAdaptedQueuePool,
    pool_size=10,
    max_overflow=0,
    pool_timeout=5,
)
if os.environ.get("SLOW_APP_WATCH", "1") == "1":  # the docs' setup; 0: an unwatched pool
    guard.watch_pool(engine)


async def work(request: Request) -> Response:
    await request.body()
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        await asyncio.sleep(HOLD)  # a query's worth of holding the connection
    return PlainTextResponse("ok")


async def page(request: Request) -> Response:
    await asyncio.sleep(HOLD)
    return Response(PAGE, media_type="application/octet-stream")  # a big report, all at once


async def big(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4096):  # 256 MiB: far more than any socket buffer
            yield CHUNK

    return StreamingResponse(chunks())


app = Starlette(
    routes=[
        Route("/work", work, methods=["GET", "POST"]),
        Route("/page", page),
        Route("/big", big),
    ],
    middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
)
