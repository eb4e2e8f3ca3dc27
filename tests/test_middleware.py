"""GuardrailsMiddleware through real Starlette and FastAPI apps, driven over ASGI."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from anyio import wait_all_tasks_blocked
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket

import guardrails as gr

pytestmark = pytest.mark.anyio


def make_app(guard: gr.Guardrails, routes: list[Route | Mount | WebSocketRoute]) -> Starlette:
    return Starlette(routes=routes, middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)])


def client_for(app: Callable[..., Awaitable[None]], root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


class Gate:
    """Holds endpoints inside the handler until the test opens it."""

    def __init__(self) -> None:
        self.opened = anyio.Event()
        self.entered = 0

    async def endpoint(self, request: Request) -> Response:
        self.entered += 1
        await self.opened.wait()
        return PlainTextResponse("done")


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def test_admitted_request_passes_and_returns_its_slot() -> None:
    guard = gr.Guardrails(concurrency=2)
    async with client_for(make_app(guard, [Route("/", ok)])) as client:
        response = await client.get("/")
    assert (response.status_code, response.text) == (200, "ok")
    snapshot = guard.snapshot()
    assert snapshot["limiter"]["in_flight"] == 0
    assert snapshot["limiter"]["admitted_total"] == 1
    assert snapshot["status"] == "pass"


async def test_overload_is_shed_fast_with_retry_after_and_small_json() -> None:
    guard = gr.Guardrails(concurrency=1, max_queue=0, queue_timeout=5)
    gate = Gate()
    app = make_app(guard, [Route("/slow", gate.endpoint)])
    responses: list[httpx.Response] = []
    async with client_for(app) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            responses.append(await client.get("/slow"))

        tg.start_soon(call)
        await wait_all_tasks_blocked()
        assert gate.entered == 1
        with anyio.fail_after(1):  # shed at once, not after queue_timeout
            shed = [await client.get("/slow") for _ in range(3)]
        gate.opened.set()
    assert [r.status_code for r in shed] == [503, 503, 503]
    assert shed[0].headers["retry-after"] == "5"
    assert shed[0].headers["content-type"] == "application/json"
    assert shed[0].json() == {"error": "overloaded", "retry_after": 5}
    assert [r.status_code for r in responses] == [200]
    assert guard.snapshot()["limiter"]["in_flight"] == 0
    assert guard.snapshot()["limiter"]["shed_by_reason"] == {"queue_full": 3}


async def test_queued_request_is_served_when_a_slot_frees() -> None:
    guard = gr.Guardrails(concurrency=1, max_queue=4, queue_timeout=5)
    gate = Gate()
    app = make_app(guard, [Route("/slow", gate.endpoint)])
    statuses: list[int] = []
    async with client_for(app) as client, anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(lambda: _status_into(client, "/slow", statuses))
        await wait_all_tasks_blocked()
        assert (gate.entered, guard.limiter.queued) == (1, 2)
        gate.opened.set()
    assert statuses == [200, 200, 200]
    assert guard.limiter.in_flight == 0


async def test_requests_queued_when_the_breaker_opens_never_reach_the_app() -> None:
    guard = gr.Guardrails(concurrency=1, max_queue=4, queue_timeout=5)
    gate = Gate()
    app = make_app(guard, [Route("/slow", gate.endpoint)])
    statuses: list[int] = []
    async with client_for(app) as client, anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(lambda: _status_into(client, "/slow", statuses))
        await wait_all_tasks_blocked()
        assert (gate.entered, guard.limiter.queued) == (1, 2)
        guard.breaker.force_open(30)  # e.g. the running request's query found the DB down
        gate.opened.set()
    assert sorted(statuses) == [200, 503, 503]
    assert gate.entered == 1  # the two that waited were refused, not run
    assert guard.limiter.in_flight == 0
    shed = guard.snapshot()["telemetry"]["shed"]
    assert {"reason": "breaker_open", "route": "/slow", "count": 2} in shed


async def test_a_queued_trial_dropped_by_a_reopening_never_reaches_the_app() -> None:
    guard = gr.Guardrails(concurrency=1, max_queue=4, queue_timeout=5)
    gate = Gate()
    app = make_app(guard, [Route("/slow", gate.endpoint)])
    statuses: list[int] = []
    async with client_for(app) as client, anyio.create_task_group() as tg:
        tg.start_soon(lambda: _status_into(client, "/slow", statuses))
        await wait_all_tasks_blocked()
        guard.breaker.force_open(0)  # the open period is over: the next request tries
        tg.start_soon(lambda: _status_into(client, "/slow", statuses))
        await wait_all_tasks_blocked()
        assert guard.breaker.state == "half_open"
        assert guard.limiter.queued == 1  # the trial holder waits for the slot
        guard.breaker.force_open(30)  # another process saw the database fail again
        gate.opened.set()
    assert sorted(statuses) == [200, 503]
    assert gate.entered == 1
    assert guard.breaker.state == "open"
    assert guard.limiter.in_flight == 0


async def _status_into(client: httpx.AsyncClient, path: str, out: list[int]) -> None:
    out.append((await client.get(path)).status_code)


async def test_exempt_and_no_db_routes_bypass_a_full_limiter() -> None:
    guard = gr.Guardrails(concurrency=1, max_queue=0)
    gate = Gate()

    @gr.policy(exempt=True)
    async def health(request: Request) -> Response:
        return PlainTextResponse("alive")

    @gr.policy(needs_db=False)
    async def static(request: Request) -> Response:
        return PlainTextResponse("static")

    app = make_app(
        guard,
        [Route("/slow", gate.endpoint), Route("/health", health), Route("/static", static)],
    )
    async with client_for(app) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/slow")
        await wait_all_tasks_blocked()
        assert (await client.get("/health")).text == "alive"
        assert (await client.get("/static")).text == "static"
        assert (await client.get("/slow")).status_code == 503
        gate.opened.set()
    assert guard.limiter.snapshot()["admitted_total"] == 1


async def test_unsafe_methods_are_refused_in_read_only_mode() -> None:
    guard = gr.Guardrails(concurrency=2)

    async def items(request: Request) -> Response:
        return JSONResponse({"method": request.method})

    app = make_app(guard, [Route("/items", items, methods=["GET", "POST"])])
    guard.set_read_only(True, reason="primary failover")
    async with client_for(app) as client:
        write = await client.post("/items")
        read = await client.get("/items")
        guard.set_read_only(False)
        after = await client.post("/items")
    assert write.status_code == 503
    assert write.json() == {"error": "read_only", "retry_after": 1}
    assert "failover" not in write.text  # the operator's reason is not for clients
    assert read.json() == {"method": "GET"}
    assert after.status_code == 200
    assert guard.snapshot()["read_only"] == {"enabled": False, "reason": None, "automatic": False}


async def test_app_error_releases_the_slot() -> None:
    guard = gr.Guardrails(concurrency=1)

    async def boom(request: Request) -> Response:
        raise RuntimeError("driver said: password=hunter2")

    app = make_app(guard, [Route("/boom", boom)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    assert "hunter2" not in response.text
    assert guard.limiter.in_flight == 0


# -- streaming, disconnects and scopes other than http, driven over raw ASGI ----------


def http_scope(path: str, method: str = "GET") -> dict[str, object]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }


async def test_streaming_response_holds_its_slot_until_the_last_chunk() -> None:
    guard = gr.Guardrails(concurrency=1)
    release_chunk = anyio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first "
        await release_chunk.wait()
        yield b"last"

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks())

    app = make_app(guard, [Route("/stream", stream)])
    sent: list[Message] = []

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    async with anyio.create_task_group() as tg:
        tg.start_soon(app, http_scope("/stream"), receive, send)
        # Not wait_all_tasks_blocked(): the slow-client watchdog looks every 0.1 s while
        # the stream is open, in step with that helper's own 0.1 s polls.
        with anyio.fail_after(5):
            while len(sent) < 2:
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)  # nothing more comes before the chunk is released
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        assert guard.limiter.in_flight == 1  # mid-stream: still holding the slot
        release_chunk.set()
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    assert b"".join(bodies) == b"first last"
    assert guard.limiter.in_flight == 0


async def test_slot_is_released_once_the_body_is_sent_before_background_work() -> None:
    guard = gr.Guardrails(concurrency=1)
    background_may_finish = anyio.Event()
    in_flight_during_background: list[int] = []

    async def after_response() -> None:
        in_flight_during_background.append(guard.limiter.in_flight)
        await background_may_finish.wait()

    async def page(request: Request) -> Response:
        return PlainTextResponse("page", background=BackgroundTask(after_response))

    app = make_app(guard, [Route("/page", page)])

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async with anyio.create_task_group() as tg:
        tg.start_soon(app, http_scope("/page"), receive, send)
        await wait_all_tasks_blocked()
        assert sent[-1] == {"type": "http.response.body", "body": b"page"}
        assert in_flight_during_background == [0]
        background_may_finish.set()
    assert guard.limiter.in_flight == 0


async def test_client_disconnect_mid_stream_returns_the_slot() -> None:
    guard = gr.Guardrails(concurrency=1)
    disconnect = anyio.Event()

    async def forever() -> AsyncIterator[bytes]:
        while True:
            yield b"tick"
            await anyio.sleep(0.01)

    async def stream(request: Request) -> Response:
        return StreamingResponse(forever())

    app = make_app(guard, [Route("/stream", stream)])

    async def receive() -> Message:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            disconnect.set()

    with anyio.fail_after(5):
        await app(http_scope("/stream"), receive, send)
    assert (guard.limiter.in_flight, guard.limiter.queued) == (0, 0)


async def test_websocket_and_lifespan_pass_through_untouched() -> None:
    guard = gr.Guardrails(concurrency=1, max_queue=0)
    events: list[str] = []

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = Starlette(
        routes=[WebSocketRoute("/ws", echo)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
        lifespan=lifespan,
    )
    held = await guard.limiter.acquire()  # every slot busy: only http would be shed

    async def run(scope: dict[str, object], incoming: list[Message]) -> list[Message]:
        outgoing: list[Message] = []

        async def receive() -> Message:
            if incoming:
                return incoming.pop(0)
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            outgoing.append(message)

        with anyio.fail_after(5):
            await app(scope, receive, send)
        return outgoing

    lifespan_out = await run(
        {"type": "lifespan", "asgi": {"version": "3.0"}},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    ws_scope = {**http_scope("/ws"), "type": "websocket", "subprotocols": []}
    ws_out = await run(
        ws_scope,
        [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hello"}],
    )
    held.release()
    assert [m["type"] for m in lifespan_out] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert events == ["startup", "shutdown"]
    assert [m["type"] for m in ws_out] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert ws_out[1]["text"] == "hello"
    assert guard.limiter.snapshot()["admitted_total"] == 1  # only the test's own permit


# -- policy resolution --------------------------------------------------------------------


async def test_patterns_give_low_priority_and_a_sub_limit() -> None:
    guard = gr.Guardrails(
        concurrency=4,
        queue_timeout=0.05,
        policies={"/reports/{path:path}": gr.Policy(priority="low", max_concurrency=1)},
    )
    gate = Gate()
    app = make_app(guard, [Route("/reports/{name}", gate.endpoint), Route("/", ok)])
    async with client_for(app) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/reports/daily")
        await wait_all_tasks_blocked()
        second = await client.get("/reports/weekly")
        plain = await client.get("/")
        gate.opened.set()
    assert second.status_code == 503  # the reports bulkhead has one slot
    assert plain.status_code == 200  # other work is untouched
    bulkheads = guard.snapshot()["limiter"]["bulkheads"]
    assert bulkheads == {"/reports/{name}": {"limit": 1, "in_flight": 0, "queued": 0}}


def test_precedence_decorator_then_most_specific_pattern_then_default() -> None:
    default = gr.Policy(priority="critical")
    guard = gr.Guardrails(
        concurrency=4,
        default_policy=default,
        policies={
            "/reports/{path:path}": gr.Policy(priority="low"),
            "/reports/daily": gr.Policy(timeout=3),
            "POST /orders/{id:int}": gr.Policy(needs_db=True, timeout=1),
            "/archive/{path:path}": gr.Policy(priority="low"),
        },
    )

    @gr.policy(exempt=True)
    async def decorated(request: Request) -> Response:
        return PlainTextResponse("x")

    app = Starlette(
        routes=[
            Route("/reports/daily", ok),
            Route("/reports/{name}", ok),
            Route("/reports/special", decorated),
            Route("/archive/{year}/reports/{name}", decorated),
            Route("/orders/{order_id:int}", ok, methods=["GET", "POST"]),
            Route("/other", ok),
        ]
    )
    resolver = guard.route_resolver()

    def resolve(method: str, path: str) -> tuple[str, gr.Policy]:
        found = resolver.resolve(app, method, path)
        return found.template, found.policy

    assert resolve("GET", "/reports/daily") == ("/reports/daily", gr.Policy(timeout=3))
    assert resolve("GET", "/reports/weekly") == ("/reports/{name}", gr.Policy(priority="low"))
    # "/reports/{name}" is listed first, so the router sends /reports/special there too.
    assert resolve("GET", "/reports/special")[0] == "/reports/{name}"
    # The decorator wins over a pattern that matches the same path.
    assert resolve("GET", "/archive/2020/reports/q1") == (
        "/archive/{year}/reports/{name}",
        gr.Policy(exempt=True),
    )
    assert resolve("POST", "/orders/7")[1].timeout == 1
    assert resolve("GET", "/orders/7")[1] is default
    assert resolve("GET", "/other")[1] is default
    assert resolve("GET", "/nowhere") == ("<unmatched>", default)
    assert resolve("GET", "/reports/x/y") == ("/reports/{path:path}", gr.Policy(priority="low"))


def test_resolution_is_cached_per_route() -> None:
    guard = gr.Guardrails(concurrency=2)
    app = Starlette(routes=[Route("/items/{id}", ok)])
    resolver = guard.route_resolver()
    first = resolver.resolve(app, "GET", "/items/1")
    assert resolver.resolve(app, "GET", "/items/2") is first  # same route, same object
    app.router.routes.append(Route("/late", ok))  # routes added later are picked up
    assert resolver.resolve(app, "GET", "/late").template == "/late"


async def test_decorator_inside_mounts_and_under_a_root_path() -> None:
    guard = gr.Guardrails(concurrency=1, max_queue=0)
    gate = Gate()

    @gr.policy(exempt=True)
    async def health(request: Request) -> Response:
        return PlainTextResponse("alive")

    api = Starlette(routes=[Route("/slow", gate.endpoint), Route("/health", health)])
    app = make_app(guard, [Mount("/api", routes=[Mount("/v1", app=api)])])
    async with client_for(app, root_path="/prefix") as client, anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/prefix/api/v1/slow")
        await wait_all_tasks_blocked()
        health_response = await client.get("/prefix/api/v1/health")
        shed = await client.get("/prefix/api/v1/slow")
        gate.opened.set()
    assert (health_response.status_code, health_response.text) == (200, "alive")
    assert shed.status_code == 503


class Report(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        return PlainTextResponse("report")


async def test_policy_on_an_http_endpoint_class() -> None:
    marked = gr.policy(priority="low", max_concurrency=1)(Report)
    assert marked is Report
    guard = gr.Guardrails(concurrency=2)
    resolved = guard.route_resolver().resolve(
        Starlette(routes=[Route("/report", Report)]), "GET", "/report"
    )
    assert resolved.priority is gr.Priority.LOW
    assert resolved.bulkhead == "/report"


async def test_fastapi_included_routers_keep_their_policies() -> None:
    guard = gr.Guardrails(concurrency=1, max_queue=0)
    gate = Gate()
    inner = APIRouter()

    @inner.get("/health")
    @gr.policy(exempt=True)
    async def health() -> dict[str, str]:
        return {"status": "alive"}

    @gr.policy(exempt=True)
    @inner.get("/ping")
    async def ping() -> dict[str, str]:
        return {"ping": "pong"}

    @inner.get("/slow")
    async def slow() -> dict[str, str]:
        gate.entered += 1
        await gate.opened.wait()
        return {"slow": "done"}

    outer = APIRouter()
    outer.include_router(inner, prefix="/inner")
    app = FastAPI()
    app.include_router(outer, prefix="/v1")
    app.add_middleware(gr.GuardrailsMiddleware, guard=guard)
    async with client_for(app) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/v1/inner/slow")
        await wait_all_tasks_blocked()
        assert gate.entered == 1
        health_response = await client.get("/v1/inner/health")
        ping_response = await client.get("/v1/inner/ping")
        shed = await client.get("/v1/inner/slow")
        gate.opened.set()
    assert health_response.json() == {"status": "alive"}
    assert ping_response.json() == {"ping": "pong"}
    assert shed.status_code == 503
    resolver = guard.route_resolver()
    assert resolver.resolve(app, "GET", "/v1/inner/slow").template == "/v1/inner/slow"


async def test_deadline_from_policy_bounds_the_queue_wait() -> None:
    guard = gr.Guardrails(
        concurrency=1, queue_timeout=30, policies={"/slow": gr.Policy(timeout=0.05)}
    )
    gate = Gate()
    app = make_app(guard, [Route("/hold", gate.endpoint), Route("/slow", gate.endpoint)])
    async with client_for(app) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/hold")  # no deadline: holds the only slot
        await wait_all_tasks_blocked()
        with anyio.fail_after(5):
            shed = await client.get("/slow")
        gate.opened.set()
    assert shed.status_code == 503
    assert shed.json() == {"error": "overloaded", "retry_after": 30}
    assert guard.limiter.snapshot()["shed_by_reason"] == {"deadline": 1}


async def test_a_handler_past_its_deadline_is_answered_503_and_frees_its_slot() -> None:
    guard = gr.Guardrails(concurrency=1, policies={"/slow": gr.Policy(timeout=0.05)})
    gate = Gate()
    app = make_app(guard, [Route("/slow", gate.endpoint)])
    async with client_for(app) as client:
        with anyio.fail_after(5):
            response = await client.get("/slow")
    assert response.status_code == 503
    assert response.json()["error"] == "timeout"
    assert guard.limiter.in_flight == 0
    assert guard.snapshot()["telemetry"]["shed"] == [
        {"reason": "timeout", "route": "/slow", "count": 1}
    ]


# -- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: gr.Guardrails(), "pass exactly one of concurrency=N"),
        (
            lambda: gr.Guardrails(concurrency=2, budget=gr.ConnectionBudget(max_connections=20)),
            "pass exactly one of concurrency=N",
        ),
        (lambda: gr.Guardrails(concurrency=0), "limit must be a whole number of slots >= 1"),
        (
            lambda: gr.Guardrails(concurrency=2, policies={"reports": gr.Policy()}),
            "must be a path starting with '/'",
        ),
        (lambda: gr.Policy(priority="urgent"), "priority must be one of"),  # type: ignore[arg-type]
        (lambda: gr.Policy(on_unavailable="retry"), "on_unavailable must be"),  # type: ignore[arg-type]
        (lambda: gr.Policy(max_concurrency=0), "max_concurrency must be a whole number >= 1"),
        (lambda: gr.Policy(timeout=-1), "timeout must be a finite number"),
    ],
)
def test_bad_configuration_fails_at_construction(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_budget_sets_the_number_of_slots() -> None:
    budget = gr.ConnectionBudget(max_connections=100, reserved=10, processes=4)
    guard = gr.Guardrails(budget=budget)
    assert guard.limiter.limit == budget.per_process == 15


def test_policy_decorator_refuses_a_second_different_policy() -> None:
    async def handler(request: Request) -> Response:
        return PlainTextResponse("ok")

    gr.policy(priority="low")(handler)
    gr.policy(priority="low")(handler)  # the same policy again is harmless
    with pytest.raises(ValueError, match="already has a different @policy"):
        gr.policy(stale_ttl=60)(handler)


def test_policy_decorator_rejects_what_it_cannot_mark() -> None:
    with pytest.raises(TypeError, match="put it on the endpoint function"):
        gr.policy(exempt=True)(print)
    with pytest.raises(TypeError, match="either a Policy or its fields"):
        gr.policy(gr.Policy(), exempt=True)


def test_error_body_never_carries_more_than_error_and_retry_after() -> None:
    from guardrails.asgi.refusal import error_response

    headers, body = error_response("overloaded", 3)
    assert json.loads(body) == {"error": "overloaded", "retry_after": 3}
    assert dict(headers)[b"retry-after"] == b"3"
