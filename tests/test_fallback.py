"""Stale fallback, read-only mode, friendly errors and cache safety through the middleware."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.fallback import MemoryCache

pytestmark = pytest.mark.anyio


def client_for(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


def open_breaker(guard: gr.Guardrails) -> None:
    """Report outages through the breaker's own API until it opens."""
    while guard.breaker.state == "closed":
        guard.breaker.record(guard.breaker.admit(), psycopg.OperationalError("connection failed"))


async def test_stale_while_the_database_is_down_read_only_writes_and_recovery(
    pg_cluster_factory: Callable[..., Any], async_engine_factory: Callable[..., AsyncEngine]
) -> None:
    server = pg_cluster_factory(max_connections=20)
    engine = async_engine_factory(server=server, pool_size=2, pool_timeout=0.5)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE notes (id serial PRIMARY KEY, body text)"))

    async def ping() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    guard = gr.Guardrails(
        concurrency=4,
        cache=MemoryCache(max_entries=100),
        breaker=gr.BreakerSettings(fail_max=2, reset_timeout=0.3, probe=ping, probe_timeout=1),
        retry=gr.RetrySettings(attempts=1),
    )

    dashboards_run = 0

    @gr.policy(stale_ttl=600)
    async def dashboard(request: Request) -> Response:
        nonlocal dashboards_run
        dashboards_run += 1
        async with engine.connect() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM notes"))).scalar_one()
        return JSONResponse({"notes": count})

    async def add_note(request: Request) -> Response:
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO notes (body) VALUES ('hi')"))
        return PlainTextResponse("saved", status_code=201)

    app = Starlette(
        routes=[Route("/dashboard", dashboard), Route("/notes", add_note, methods=["POST"])],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )

    async def timed_get(path: str) -> tuple[float, httpx.Response, float]:
        asked = time.time()
        response = await client.get(path)
        return asked, response, time.time()

    async with client_for(app) as client:
        assert (await client.post("/notes")).status_code == 201
        # The page is stored while this request runs: between these two clock readings.
        stored_from, live, stored_by = await timed_get("/dashboard")
        assert live.json() == {"notes": 1}
        assert "x-guardrails" not in live.headers

        await anyio.to_thread.run_sync(server.stop)
        # The first requests find out the hard way; each still gets the stale page.
        answers = [await timed_get("/dashboard") for _ in range(3)]
        assert guard.breaker.state == "open"
        await anyio.sleep(1)  # so the page is at least a second old: Age >= 1 below
        run_before = dashboards_run
        fast = await timed_get("/dashboard")
        run_while_open = dashboards_run - run_before
        write = await client.post("/notes")

        await anyio.to_thread.run_sync(server.start)
        with anyio.fail_after(5):
            while guard.breaker.state != "closed":
                await anyio.sleep(0.02)
        assert (await client.post("/notes")).status_code == 201
        fresh = await client.get("/dashboard")
    await guard.aclose()

    for asked, response, answered in [*answers, fast]:
        assert response.status_code == 200
        assert response.json() == {"notes": 1}
        assert response.headers["x-guardrails"] == "stale"
        # Age is the whole seconds from storing to answering, by the clocks around both.
        age = int(response.headers["age"])
        assert int(asked - stored_by) <= age <= int(answered - stored_from)
    assert int(fast[0] - stored_by) >= 1
    # While the breaker is open the page is served before the app runs: no pool wait.
    assert run_while_open == 0
    assert write.status_code == 503
    assert write.json()["error"] == "read_only"
    assert int(write.headers["retry-after"]) >= 1
    assert fresh.json() == {"notes": 2}
    assert "x-guardrails" not in fresh.headers
    fallbacks = guard.snapshot()["telemetry"]["fallbacks"]
    assert {"kind": "stale", "route": "/dashboard", "count": 4} in fallbacks


def build_app(guard: gr.Guardrails) -> Starlette:
    async def page(request: Request) -> Response:
        return JSONResponse(
            {
                "for": user_key(request),
                "path": request.url.path,
                "host": request.headers.get("host"),
                "lang": request.headers.get("accept-language"),
                # Behind a proxy, links are rendered for the host and scheme it names.
                "site": request.headers.get("x-forwarded-host"),
                "proto": request.headers.get("x-forwarded-proto"),
            },
            headers={"vary": "Accept-Language"},
        )

    async def set_cookie(request: Request) -> Response:
        response = JSONResponse({"for": None})
        response.set_cookie("session", "new")
        return response

    async def private(request: Request) -> Response:
        return JSONResponse({"for": None}, headers={"cache-control": request.query_params["cc"]})

    def user_key(request: Request) -> str | None:
        return (
            request.headers.get("authorization")
            or request.cookies.get("session")
            or request.headers.get("x-api-key")
            or request.headers.get("x-tenant-token")
        )

    @gr.policy(stale_ttl=60, cache_key=user_key)
    async def mine(request: Request) -> Response:
        return await page(request)

    @gr.policy(stale_ttl=60)
    async def shared(request: Request) -> Response:
        return await page(request)

    @gr.policy(cache_ttl=60, stale_ttl=60, cache_key=user_key)
    async def fresh(request: Request) -> Response:
        return await page(request)

    routes = [
        Route("/mine/{n}", mine),
        Route("/shared/{n}", shared),
        Route("/fresh/{n}", fresh),
        Route("/cookie", gr.policy(stale_ttl=60)(set_cookie)),
        Route("/private", gr.policy(stale_ttl=60)(private)),
    ]
    return Starlette(routes=routes, middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)])


Ask = tuple[str, str | None, str, str, str | None, str | None, str | None]
REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(["/mine/1", "/mine/2", "/shared/1", "/shared/2", "/fresh/1", "/fresh/2"]),
        st.sampled_from([None, "alice", "bob", "carol"]),
        # Every way a user says who they are: the defaults and one identity_headers entry.
        st.sampled_from(["authorization", "cookie", "x-api-key", "x-tenant-token"]),
        st.sampled_from(["a.example", "b.example"]),
        st.sampled_from([None, "en", "fr"]),
        st.sampled_from([None, "evil.example"]),  # X-Forwarded-Host
        st.sampled_from([None, "https"]),  # X-Forwarded-Proto
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(warm=REQUESTS, probe=REQUESTS)
def test_no_cached_response_ever_reaches_a_user_it_was_not_made_for(
    warm: list[Ask], probe: list[Ask]
) -> None:
    """Users, hosts and Vary'd headers at random, served live, from fresh hits and stale."""

    def headers(
        user: str | None, how: str, host: str, lang: str | None, site: str | None, proto: str | None
    ) -> dict[str, str]:
        sent = {"host": host}
        if lang is not None:
            sent["accept-language"] = lang
        if site is not None:
            sent["x-forwarded-host"] = site
        if proto is not None:
            sent["x-forwarded-proto"] = proto
        if user is not None:
            sent.update({"cookie": f"session={user}"} if how == "cookie" else {how: user})
        return sent

    def check(response: httpx.Response, path: str, *asked: str | None) -> None:
        user, _, host, lang, site, proto = asked
        assert response.json() == {
            "for": user,
            "path": path,
            "host": host,
            "lang": lang,
            "site": site,
            "proto": proto,
        }
        if response.headers.get("x-guardrails") and path.startswith("/shared/"):
            assert user is None  # credentials without cache_key: never stored

    async def scenario() -> None:
        guard = gr.Guardrails(
            concurrency=4,
            cache=MemoryCache(max_entries=50),
            identity_headers=("x-tenant-token",),
        )
        async with client_for(build_app(guard)) as client:
            for path, *asked in warm:  # healthy: live answers or fresh hits
                response = await client.get(path, headers=headers(*asked))  # type: ignore[arg-type]
                assert response.status_code == 200
                assert response.headers.get("x-guardrails") in (None, "hit")
                check(response, path, *asked)
            open_breaker(guard)  # from now on only stored responses can answer
            for path, *asked in probe:
                response = await client.get(path, headers=headers(*asked))  # type: ignore[arg-type]
                if response.status_code == 503:
                    continue
                assert response.headers["x-guardrails"] in ("stale", "hit")
                check(response, path, *asked)

    anyio.run(scenario)


async def test_set_cookie_no_store_and_private_are_never_replayed() -> None:
    guard = gr.Guardrails(concurrency=4, cache=MemoryCache(max_entries=50))
    async with client_for(build_app(guard)) as client:
        assert (await client.get("/cookie")).status_code == 200
        client.cookies.clear()  # a request carrying the cookie would not be stored at all
        for cc in ("no-store", "private", "private, max-age=60", "public, max-age=60"):
            assert (await client.get("/private", params={"cc": cc})).status_code == 200
        open_breaker(guard)
        cookie = await client.get("/cookie")
        client.cookies.clear()
        refused = [
            (await client.get("/private", params={"cc": cc})).status_code
            for cc in ("no-store", "private", "private, max-age=60")
        ]
        public = await client.get("/private", params={"cc": "public, max-age=60"})
    assert cookie.status_code == 503
    assert "set-cookie" not in cookie.headers
    assert refused == [503, 503, 503]
    assert public.status_code == 200
    assert public.headers["x-guardrails"] == "stale"


async def test_fresh_cache_hits_skip_the_database_and_the_limiter() -> None:
    calls = 0

    @gr.policy(cache_ttl=30)
    async def report(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return PlainTextResponse(f"report #{calls}")

    guard = gr.Guardrails(concurrency=1, max_queue=0, cache=MemoryCache())
    app = Starlette(
        routes=[Route("/report", report)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    async with client_for(app) as client:
        first = await client.get("/report")
        second = await client.get("/report")
        other_query = await client.get("/report?page=2")
    assert (first.text, second.text, other_query.text) == ("report #1", "report #1", "report #2")
    assert second.headers["x-guardrails"] == "hit"
    assert "x-guardrails" not in first.headers
    assert guard.limiter.snapshot()["admitted_total"] == 2


async def test_a_large_streamed_body_passes_through_whole_and_is_not_stored() -> None:
    from starlette.responses import StreamingResponse

    chunk = b"x" * 1024

    @gr.policy(stale_ttl=60)
    async def big(request: Request) -> Response:
        async def body() -> Any:
            for _ in range(8):
                yield chunk

        return StreamingResponse(body(), media_type="text/plain")

    store = MemoryCache(max_entries=10, max_bytes=64 * 1024, max_entry_bytes=4 * 1024)
    guard = gr.Guardrails(concurrency=2, cache=store)
    app = Starlette(
        routes=[Route("/big", big)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    async with client_for(app) as client:
        whole = await client.get("/big")
        open_breaker(guard)
        after = await client.get("/big")
    assert whole.content == chunk * 8
    assert after.status_code == 503
    assert store.snapshot()["entries"] == 0


async def test_browsers_get_a_friendly_page_and_apps_can_build_their_own() -> None:
    guard = gr.Guardrails(concurrency=1, breaker=gr.BreakerSettings(reset_timeout=12))

    async def page(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/page", page)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    browser = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    async with client_for(app) as client:
        open_breaker(guard)
        html = await client.get("/page", headers=browser)
        api = await client.get("/page", headers={"accept": "application/json, text/html;q=0.5"})

    assert html.status_code == 503
    assert html.headers["content-type"].startswith("text/html")
    assert "try again in 12 seconds" in html.text
    assert html.headers["retry-after"] == "12"
    assert api.json() == {"error": "unavailable", "retry_after": 12}

    def custom(request: Request, error: str, retry_after: int) -> Response | None:
        if request.url.path != "/page":
            return None
        return PlainTextResponse(f"{error}, back in {retry_after}", status_code=503)

    guard2 = gr.Guardrails(concurrency=1, error_response=custom)
    app2 = Starlette(
        routes=[Route("/page", page)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard2)],
    )
    async with client_for(app2) as client:
        open_breaker(guard2)
        made = await client.get("/page")
    assert made.text == "unavailable, back in 30"
    assert made.headers["retry-after"] == "30"


async def test_low_priority_is_shed_before_normal_under_load() -> None:
    guard = gr.Guardrails(concurrency=8, max_queue=16, queue_timeout=0.2)
    release = anyio.Event()

    async def work(request: Request) -> Response:
        with anyio.move_on_after(0.05):
            await release.wait()
        return PlainTextResponse("ok")

    @gr.policy(priority="low")
    async def report(request: Request) -> Response:
        return await work(request)

    app = Starlette(
        routes=[Route("/normal", work), Route("/report", report)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    statuses: dict[str, list[int]] = {"/normal": [], "/report": []}
    async with client_for(app) as client:

        async def one(path: str) -> None:
            statuses[path].append((await client.get(path)).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(40):  # a burst of equal demand for both, 5x the slots
                tg.start_soon(one, "/normal")
                tg.start_soon(one, "/report")
    normal_ok = statuses["/normal"].count(200) / 40
    report_ok = statuses["/report"].count(200) / 40
    assert normal_ok > report_ok
    assert statuses["/report"].count(503) > statuses["/normal"].count(503)
    assert guard.limiter.in_flight == 0


def fallback_app(guard: gr.Guardrails, release: anyio.Event) -> Starlette:
    served = 0

    async def answer(request: Request) -> Response:
        nonlocal served
        served += 1
        if request.headers.get("x-wait"):  # not part of the cache key
            await release.wait()
        return JSONResponse({"served": served})

    routes = [Route(path, answer) for path in FALLBACK_POLICIES]
    return Starlette(routes=routes, middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)])


FALLBACK_POLICIES = {
    "/stale": gr.Policy(stale_ttl=0.5),
    "/strict": gr.Policy(stale_ttl=60, on_unavailable="reject"),
    "/slow": gr.Policy(stale_ttl=60, timeout=0.2),
}


async def test_a_shed_request_gets_the_stale_page_until_stale_ttl_passes() -> None:
    guard = gr.Guardrails(
        concurrency=1, max_queue=0, cache=MemoryCache(), policies=FALLBACK_POLICIES
    )
    release = anyio.Event()
    async with client_for(fallback_app(guard, release)) as client:
        assert (await client.get("/stale")).json() == {"served": 1}
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: client.get("/stale", headers={"x-wait": "1"})
            )  # takes the only slot, holds it
            with anyio.fail_after(5):
                while guard.limiter.in_flight < 1:
                    await anyio.sleep(0.01)
            shed = await client.get("/stale")
            await anyio.sleep(0.6)  # past stale_ttl
            too_old = await client.get("/stale")
            release.set()
    assert shed.status_code == 200
    assert shed.json() == {"served": 1}
    assert shed.headers["x-guardrails"] == "stale"
    assert too_old.status_code == 503
    assert too_old.json()["error"] == "overloaded"
    assert guard.limiter.in_flight == 0
    fallbacks = guard.snapshot()["telemetry"]["fallbacks"]
    assert {"kind": "stale", "route": "/stale", "count": 1} in fallbacks
    assert {"kind": "rejected", "route": "/stale", "count": 1} in fallbacks


async def test_on_unavailable_reject_never_serves_stale() -> None:
    guard = gr.Guardrails(concurrency=2, cache=MemoryCache(), policies=FALLBACK_POLICIES)
    async with client_for(fallback_app(guard, anyio.Event())) as client:
        assert (await client.get("/strict")).status_code == 200
        open_breaker(guard)
        refused = await client.get("/strict")
    assert refused.status_code == 503
    assert refused.json()["error"] == "unavailable"
    assert "x-guardrails" not in refused.headers


async def test_a_request_past_its_deadline_gets_the_stale_page() -> None:
    guard = gr.Guardrails(concurrency=2, cache=MemoryCache(), policies=FALLBACK_POLICIES)
    release = anyio.Event()
    async with client_for(fallback_app(guard, release)) as client:
        assert (await client.get("/slow")).json() == {"served": 1}
        # Never released, so the handler cannot finish: only the deadline can answer
        # (fail_after only stops a hang).
        with anyio.fail_after(10):
            late = await client.get("/slow", headers={"x-wait": "1"})
    assert not release.is_set()
    assert late.status_code == 200
    assert late.json() == {"served": 1}
    assert late.headers["x-guardrails"] == "stale"
    assert guard.limiter.in_flight == 0
    assert {"reason": "timeout", "route": "/slow", "count": 1} in guard.snapshot()["telemetry"][
        "shed"
    ]


class SlowStore(MemoryCache):
    """A response store whose writes take as long as the test says (a remote store)."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = anyio.Event()
        self.may_finish = anyio.Event()

    async def set(self, key: str, response: gr.CachedResponse, ttl: float) -> None:
        self.writing.set()
        await self.may_finish.wait()
        await super().set(key, response, ttl)


async def test_the_slot_goes_back_before_a_slow_store_finishes_writing() -> None:
    store = SlowStore()

    @gr.policy(stale_ttl=60)
    async def page(request: Request) -> Response:
        return PlainTextResponse("page")

    guard = gr.Guardrails(concurrency=1, cache=store)
    app = Starlette(
        routes=[Route("/page", page)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    async with client_for(app) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/page")
        with anyio.fail_after(5):
            await store.writing.wait()
        in_flight_while_writing = guard.limiter.in_flight
        store.may_finish.set()
    assert in_flight_while_writing == 0
    assert store.snapshot()["entries"] >= 1


async def test_broken_callbacks_never_turn_into_500s(caplog: pytest.LogCaptureFixture) -> None:
    def numeric_key(request: Request) -> Any:
        return 42  # not a str: the request goes on, uncached

    def not_a_response(request: Request, error: str, retry_after: int) -> Any:
        return {"error": error}  # not a Response: the default 503 goes out

    @gr.policy(stale_ttl=60, cache_key=numeric_key)
    async def page(request: Request) -> Response:
        return JSONResponse({"page": 1})

    guard = gr.Guardrails(
        concurrency=2, cache=MemoryCache(max_entries=10), error_response=not_a_response
    )
    app = Starlette(
        routes=[Route("/page", page)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    with caplog.at_level("WARNING", logger="guardrails"):
        async with client_for(app) as client:
            live = [await client.get("/page", headers={"cookie": "s=1"}) for _ in range(3)]
            open_breaker(guard)
            refused = [await client.get("/page", headers={"cookie": "s=1"}) for _ in range(3)]
    assert [r.status_code for r in live] == [200] * 3
    assert all("x-guardrails" not in r.headers for r in live)
    assert [r.status_code for r in refused] == [503] * 3
    assert refused[0].json() == {
        "error": "unavailable",
        "retry_after": refused[0].json()["retry_after"],
    }
    assert int(refused[0].headers["retry-after"]) >= 1
    messages = [r.getMessage() for r in caplog.records if r.name == "guardrails"]
    # Once each, whatever the number of requests; no driver or app text in them.
    assert sum("cache_key of /page returned int" in m for m in messages) == 1
    assert sum("error_response factory returned dict" in m for m in messages) == 1
