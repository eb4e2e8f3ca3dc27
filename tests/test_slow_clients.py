"""Slow and hostile clients hold no database slot: real uvicorn, real sockets on loopback.

A body is read before a slot is taken (bounded by ``max_body`` and ``body_timeout``);
a client that stops reading its response is let go after ``send_timeout``; a client
hanging up mid-response says nothing about the database.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message
from test_end_to_end import serve

import guardrails as gr

pytestmark = pytest.mark.anyio

CHUNK = b"x" * (1 << 16)


def build_app(guard: gr.Guardrails) -> Starlette:
    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({"bytes": len(body), "in_flight": guard.limiter.in_flight})

    @gr.policy(max_body=None)
    async def stream_in(request: Request) -> Response:
        return await echo(request)

    async def big(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(2000):  # 128 MiB: far more than the socket buffers hold
                yield CHUNK

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    return Starlette(
        routes=[
            Route("/echo", echo, methods=["POST"]),
            Route("/big", big),
            Route("/stream-in", stream_in, methods=["POST"]),
        ],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )


def host_port(base_url: str) -> tuple[str, int]:
    url = httpx.URL(base_url)
    assert url.port is not None
    return url.host, url.port


def open_slow_body(base_url: str, length: int = 1000) -> socket.socket:
    """A client that announces a body and sends only its first byte."""
    sock = socket.create_connection(host_port(base_url))
    sock.sendall(
        b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Type: text/plain\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\nx"
    )
    return sock


def read_status(sock: socket.socket) -> int:
    sock.settimeout(10)
    data = b""
    while b"\r\n" not in data:
        more = sock.recv(1024)
        if not more:
            break
        data += more
    return int(data.split(b" ", 2)[1])


async def test_slow_bodies_hold_no_slot_and_time_out_with_408() -> None:
    guard = gr.Guardrails(
        concurrency=2, default_policy=gr.Policy(body_timeout=1.0), queue_timeout=0.2
    )
    async with serve(build_app(guard)) as base_url:
        slow = [open_slow_body(base_url) for _ in range(6)]  # three times the slots
        try:
            await anyio.sleep(0.3)
            assert guard.limiter.in_flight == 0  # reading their bodies takes no slot
            async with httpx.AsyncClient(base_url=base_url) as client:
                answers = [await client.post("/echo", content=b"y" * 10) for _ in range(5)]
            assert [a.status_code for a in answers] == [200] * 5
            assert all(a.json() == {"bytes": 10, "in_flight": 1} for a in answers)
            statuses = [await anyio.to_thread.run_sync(read_status, s) for s in slow]
        finally:
            for sock in slow:
                sock.close()
    assert statuses == [408] * 6
    assert guard.limiter.in_flight == 0
    assert guard.limiter.snapshot()["shed_total"] == 0


async def test_a_body_over_max_body_gets_413_before_any_slot() -> None:
    guard = gr.Guardrails(concurrency=2, default_policy=gr.Policy(max_body=100))
    async with serve(build_app(guard)) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        declared = await client.post("/echo", content=b"y" * 101)

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(3):
                yield b"z" * 50

        streamed = await client.post("/echo", content=chunked())
        fits = await client.post("/echo", content=b"y" * 100)
    assert (declared.status_code, declared.json()) == (413, {"error": "body_too_large"})
    assert streamed.status_code == 413
    assert fits.json() == {"bytes": 100, "in_flight": 1}
    assert guard.limiter.admitted_total == 1


async def test_a_route_that_streams_its_upload_gets_the_body_unread() -> None:
    guard = gr.Guardrails(concurrency=2, default_policy=gr.Policy(max_body=10))
    async with serve(build_app(guard)) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        answer = await client.post("/stream-in", content=b"y" * 1000)
    assert answer.json() == {"bytes": 1000, "in_flight": 1}


async def test_a_client_that_stops_reading_is_let_go_after_send_timeout() -> None:
    guard = gr.Guardrails(
        concurrency=2, default_policy=gr.Policy(send_timeout=0.5), queue_timeout=0.2
    )
    async with serve(build_app(guard)) as base_url:
        readers = []
        for _ in range(4):  # twice the slots: each stops reading after the headers
            sock = socket.create_connection(host_port(base_url))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
            readers.append(sock)
        try:
            with anyio.fail_after(10):
                while guard.limiter.admitted_total < 2:  # the readers hold both slots
                    await anyio.sleep(0.01)
                while guard.limiter.in_flight:  # until the watchdog lets go of them
                    await anyio.sleep(0.05)
            assert guard.limiter.admitted_total == 2
            async with httpx.AsyncClient(base_url=base_url) as client:
                answers = [await client.post("/echo", content=b"ok") for _ in range(4)]
        finally:
            for sock in readers:
                sock.close()
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert guard.limiter.in_flight == 0


async def test_a_client_hanging_up_mid_response_never_opens_the_breaker() -> None:
    guard = gr.Guardrails(concurrency=2, breaker=gr.BreakerSettings(fail_max=1))

    async def page(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"row\n"

        return StreamingResponse(chunks())

    app = Starlette(
        routes=[Route("/", page)], middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)]
    )
    sent: list[str] = []

    async def hanging_up(message: Message) -> None:
        sent.append(message["type"])
        if message["type"] == "http.response.body":
            raise ConnectionResetError(104, "Connection reset by peer")

    async def receive() -> Message:
        await anyio.sleep_forever()  # the client sends nothing more (no disconnect either)
        raise AssertionError("unreachable")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"app")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    for _ in range(5):
        with pytest.raises(ConnectionResetError):
            await app(scope, receive, hanging_up)
    assert sent.count("http.response.start") == 5
    assert (guard.breaker.state, guard.breaker.failures) == ("closed", 0)
    assert guard.limiter.in_flight == 0


async def test_a_slow_reader_cannot_talk_the_adaptive_limit_down() -> None:
    # Every hold that lasted while the client read is no sample: the streamed page's
    # slot is held while its first chunk waits on the client, the page's is not.
    guard = gr.Guardrails(concurrency=4, adaptive=gr.AdaptiveLimit(window=0.001, min_samples=1))
    adaptive = guard.limiter.adaptive
    assert adaptive is not None

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first "
        yield b"last"

    async def streamed(request: Request) -> Response:
        await anyio.sleep(0.002)
        return StreamingResponse(chunks())

    async def page(request: Request) -> Response:
        await anyio.sleep(0.002)
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/streamed", streamed), Route("/page", page)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )

    async def receive() -> Message:
        await anyio.sleep_forever()  # no body, and the client stays connected
        raise AssertionError("unreachable")

    async def slow_reader(message: Message) -> None:
        if message["type"] == "http.response.body":
            await anyio.sleep(0.3)  # the client takes its time with every chunk

    def scope(path: str) -> dict[str, object]:
        return {
            "type": "http",
            "method": "GET",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "scheme": "http",
            "query_string": b"",
            "headers": [],
            "server": ("app", 80),
            "client": ("client", 1234),
            "http_version": "1.1",
        }

    for _ in range(3):
        await app(scope("/streamed"), receive, slow_reader)
    assert (adaptive.windows_total, adaptive.baseline) == (0, None)
    for _ in range(3):
        await app(scope("/page"), receive, slow_reader)
    assert adaptive.windows_total >= 1
    assert adaptive.baseline is not None
    assert adaptive.baseline < 0.3  # the client's 0.3 s per chunk is not in it
    assert guard.limiter.in_flight == 0
