"""RedisCache on a real redis-server: round trips, TTL, Vary, damaged entries, Redis down."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable

import anyio
import httpx
import pytest
from pgcluster import free_port
from redis.asyncio import Redis
from redisserver import RedisServer
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.fallback import (
    CachedResponse,
    decode_response,
    encode_response,
    lookup,
    make_key,
    remember,
)

pytestmark = pytest.mark.anyio


def prefix() -> str:
    return f"test:{random.getrandbits(32):08x}:"


def response(body: bytes = b"hello", **kwargs: object) -> CachedResponse:
    headers = ((b"content-type", b"text/plain"), (b"x-raw", bytes(range(128, 256))))
    return CachedResponse.build(200, headers, body, **kwargs)  # type: ignore[arg-type]


def test_encoding_round_trips_every_byte_and_refuses_anything_else() -> None:
    original = CachedResponse.build(
        200,
        [(b"vary", b"Accept-Encoding"), (b"x-raw", bytes(range(256)))],
        bytes(range(256)) * 3,
        stored_at=1700000000.25,
    )
    assert decode_response(encode_response(original)) == original
    for junk in (b"", b"gr1", b"\x80\x04\x95pickle", b"gr1\x00\x00\x00\x05{}abc", b"gr1\xff\xff"):
        with pytest.raises(ValueError, match="guardrails response entry"):
            decode_response(junk)


async def test_round_trip_and_ttl(redis_url: str) -> None:
    store = gr.RedisCache(redis_url, prefix=prefix(), timeout=2)
    stored = response()
    await store.set("k", stored, 0.2)
    assert await store.get("k") == stored
    raw = Redis.from_url(redis_url)
    ttl_ms = await raw.pttl(store.prefix + "k")
    assert 0 < ttl_ms <= 200  # bounded by the TTL in Redis itself
    await asyncio.sleep(0.3)
    assert await store.get("k") is None
    await store.set("gone", stored, 5)
    await store.delete("gone")
    assert await store.get("gone") is None
    await store.set("zero", stored, 0)
    assert await store.get("zero") is None
    assert store.snapshot()["hits"] == 1
    assert store.snapshot()["errors"] == 0
    await raw.aclose()
    await store.aclose()


async def test_vary_variants_live_side_by_side(redis_url: str) -> None:
    store = gr.RedisCache(redis_url, prefix=prefix(), timeout=2)
    gzip = [(b"host", b"a"), (b"accept-encoding", b"gzip")]
    plain = [(b"host", b"a"), (b"accept-encoding", b"identity")]
    varied = CachedResponse.build(200, [(b"vary", b"Accept-Encoding")], b"zipped")
    await remember(store, "GET", "/p", b"", gzip, None, varied, 5)
    assert await lookup(store, "GET", "/p", b"", gzip, None) == varied
    assert await lookup(store, "GET", "/p", b"", plain, None) is None
    await store.aclose()


async def test_too_large_and_damaged_entries_are_misses(redis_url: str) -> None:
    store = gr.RedisCache(redis_url, prefix=prefix(), max_entry_bytes=1000, timeout=2)
    await store.set("big", response(b"x" * 2000), 5)
    assert await store.get("big") is None
    assert store.snapshot()["too_large"] == 1
    raw = Redis.from_url(redis_url)
    await raw.set(store.prefix + "bad", b"\x80\x04\x95 not ours", px=5000)
    assert await store.get("bad") is None
    assert store.snapshot()["damaged"] == 1
    await raw.aclose()
    await store.aclose()


async def test_redis_down_gives_misses_and_dropped_writes_then_recovers(
    redis_factory: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="guardrails")
    server = redis_factory()
    store = gr.RedisCache(server.url, prefix=prefix(), retry_interval=0.2)
    await store.set("k", response(), 30)
    server.stop()
    for _ in range(5):
        assert await store.get("k") is None
        await store.set("k2", response(), 30)  # dropped, no exception
        await store.delete("k")
    snapshot = store.snapshot()
    assert snapshot["available"] is False
    assert snapshot["errors"] >= 1
    assert snapshot["skipped"] >= 1  # calls inside retry_interval made no I/O
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1
    server.start()
    await asyncio.sleep(0.25)
    await store.set("k3", response(b"again"), 30)
    found = await store.get("k3")
    assert found is not None
    assert found.body == b"again"
    assert store.snapshot()["available"] is True
    await store.aclose()
    server.close()


async def test_unreachable_redis_never_fails_a_request() -> None:
    store = gr.RedisCache(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix())
    guard = gr.Guardrails(concurrency=4, cache=store)
    calls = 0

    @gr.policy(cache_ttl=30, stale_ttl=600)
    async def page(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return PlainTextResponse("fresh")

    app = Starlette(
        routes=[Route("/page", page)], middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)]
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for _ in range(3):
            reply = await client.get("/page")
            assert reply.status_code == 200
            assert reply.text == "fresh"
    assert calls == 3
    assert guard.limiter.in_flight == 0
    await guard.aclose()
    await store.aclose()


async def test_one_process_serves_what_another_stored(redis_url: str) -> None:
    shared = prefix()
    calls = 0

    @gr.policy(cache_ttl=30)
    async def page(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return PlainTextResponse(f"made {calls}")

    clients = []
    stores = []
    for _ in range(2):
        store = gr.RedisCache(redis_url, prefix=shared)
        stores.append(store)
        guard = gr.Guardrails(concurrency=4, cache=store)
        app = Starlette(
            routes=[Route("/page", page)],
            middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
        )
        clients.append(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
        )
    first = await clients[0].get("/page")
    second = await clients[1].get("/page")
    assert first.text == second.text == "made 1"
    assert second.headers["x-guardrails"] == "hit"
    assert calls == 1
    key = make_key("GET", "/page", b"", [(b"host", b"app")], (), None)
    assert await stores[1].get(key) is not None
    for client in clients:
        await client.aclose()
    for store in stores:
        await store.aclose()


async def test_the_guard_closes_its_redis_store_on_shutdown(redis_url: str) -> None:
    store = gr.RedisCache(redis_url, prefix=prefix(), timeout=2)
    guard = gr.Guardrails(concurrency=2, cache=store)
    raw = Redis.from_url(redis_url)
    before = len(await raw.client_list())
    await store.set("k", response(), 5)  # opens the store's connection
    assert len(await raw.client_list()) == before + 1
    await guard.aclose()
    for _ in range(100):  # the server notices the close within moments
        if len(await raw.client_list()) == before:
            break
        await asyncio.sleep(0.02)
    assert len(await raw.client_list()) == before
    await raw.aclose()


async def test_a_store_moved_to_another_event_loop_closes_the_old_loops_connections(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    store = gr.RedisCache(server.url, prefix=prefix())
    raw = Redis.from_url(server.url)

    async def others() -> int:
        return len(await raw.client_list()) - 1  # every connection but our own

    # A loop in another thread, still running, uses the store first.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    stored = response()
    try:
        asyncio.run_coroutine_threadsafe(store.set("k", stored, 5), loop).result(5)
        assert await others() == 1
        assert await store.get("k") == stored  # now on this loop: a new client
        with anyio.fail_after(5):
            while await others() != 1:  # the old loop closed its own connection
                await anyio.sleep(0.02)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        await store.aclose()
        await raw.aclose()
        server.close()
