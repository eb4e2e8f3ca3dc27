"""GuardedTransport against real servers on loopback: a uvicorn upstream and a closed port.

Counts are taken where they happen: at the upstream (requests that arrived) or in a
counting transport wrapped around the real ``httpx.AsyncHTTPTransport`` (connection
attempts, as a user would count them). No test asserts a wall-clock duration; a few
assert that a wait was at least as long as asked, which no clock noise can break.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from upstream import Upstream

import guardrails as gr
from guardrails import context
from guardrails.outcome import Outcome

pytestmark = pytest.mark.anyio


class Counting(httpx.AsyncBaseTransport):
    """A user's transport: the real AsyncHTTPTransport, counting what is handed to it."""

    def __init__(self, after_failure: Callable[[], Awaitable[None]] | None = None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.attempts = 0
        self.failures = 0
        self.after_failure = after_failure

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        try:
            return await self.inner.handle_async_request(request)
        except Exception:
            self.failures += 1
            if self.after_failure is not None:
                await self.after_failure()
            raise

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dead() -> Iterator[Upstream]:
    """A closed port: bound, never listening, so every connection is refused."""
    port = Upstream(listen=False)
    try:
        yield port
    finally:
        port.stop()


@pytest.fixture
def guard() -> Iterator[gr.Guardrails]:
    guard = gr.Guardrails(concurrency=4)
    yield guard
    # Nothing outbound ever reaches the database breaker.
    assert guard.breaker.state == "closed"
    assert guard.breaker.failures == 0
    assert guard.breaker.transitions == 0


def client(transport: gr.GuardedTransport, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, **kwargs)


def origin_of(transport: gr.GuardedTransport, url: str) -> dict[str, Any]:
    (found,) = (o for o in transport.snapshot()["origins"] if o["origin"] == url)
    return found


async def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.005)


async def ping() -> None:
    return None


# -- the public surface and its settings --------------------------------------------------


def test_public_names() -> None:
    assert {"GuardedTransport", "OriginUnavailable"} <= set(gr.__all__)
    assert issubclass(gr.OriginUnavailable, gr.Shed)
    assert issubclass(gr.OriginUnavailable, gr.Unavailable)
    refused = gr.OriginUnavailable("https://api.example.com:443", "breaker_open", retry_after=7)
    assert (refused.origin, refused.reason, refused.retry_after) == (
        "https://api.example.com:443",
        "breaker_open",
        7,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be >= 1"),
        ({"max_concurrency": 2.5}, TypeError, "whole number"),
        ({"queue_timeout": -1}, ValueError, "queue_timeout"),
        ({"failure_statuses": (200,)}, ValueError, "400 to 599"),
        ({"retry_statuses": "503"}, TypeError, "collection of HTTP status codes"),
        ({"deadline_header": "bad header"}, ValueError, "HTTP header name"),
        (
            {"breaker": gr.BreakerSettings(probe=lambda: anyio.lowlevel.checkpoint())},
            ValueError,
            "probe",
        ),
        ({"breaker": {"fail_max": 3}}, TypeError, "BreakerSettings"),
        ({"retry": 3}, TypeError, "RetrySettings"),
        ({"name": ""}, ValueError, "name"),
        ({"guard": object()}, TypeError, "Guardrails"),
    ],
)
def test_bad_settings_fail_at_construction(
    kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        gr.GuardedTransport(**kwargs)


def test_inner_transport_must_be_async() -> None:
    with pytest.raises(TypeError, match="AsyncBaseTransport"):
        gr.GuardedTransport(httpx.HTTPTransport())  # type: ignore[arg-type]


async def test_names_are_unique_per_guard_until_closed(guard: gr.Guardrails) -> None:
    first = gr.GuardedTransport(guard=guard)
    with pytest.raises(ValueError, match="name='payments'"):
        gr.GuardedTransport(guard=guard)
    other = gr.GuardedTransport(guard=guard, name="search")
    assert guard.outbound == (first, other)
    await first.aclose()  # e.g. the end of one lifespan: the next one's client takes its place
    again = gr.GuardedTransport(guard=guard)
    assert guard.outbound == (other, again)
    assert [t["name"] for t in guard.snapshot()["outbound"]] == ["search", "default"]
    await other.aclose()
    await again.aclose()


# -- breakers per origin ------------------------------------------------------------------


async def test_a_call_passes_through(guard: gr.Guardrails, upstream: Upstream) -> None:
    transport = gr.GuardedTransport(guard=guard)
    async with client(transport) as http:
        response = await http.get(upstream.url + "/ok")
    assert (response.status_code, response.text) == (200, "ok")
    origin = origin_of(transport, upstream.url)
    assert (origin["calls_total"], origin["attempts_total"], origin["in_flight"]) == (1, 1, 0)
    assert origin["breaker"]["state"] == "closed"
    assert origin["latency"]["count"] == 1


async def test_dead_origin_gets_fail_max_connection_attempts(
    guard: gr.Guardrails, dead: Upstream
) -> None:
    counting = Counting()
    transport = gr.GuardedTransport(
        counting, guard=guard, breaker=gr.BreakerSettings(fail_max=5, reset_timeout=30)
    )
    errors: list[Exception] = []
    async with client(transport) as http:
        for _ in range(1000):
            try:
                await http.get(dead.url + "/anything")
            except Exception as exc:
                errors.append(exc)
    assert len(errors) == 1000
    # Retries included, the breaker opened after exactly fail_max attempts.
    assert counting.attempts == 5
    refused = [e for e in errors if isinstance(e, gr.OriginUnavailable)]
    # The first call tried three times; the second twice, its third try refused (the
    # breaker had opened); every other call refused without a connection attempt.
    assert len(refused) == 999
    assert {(e.origin, e.reason) for e in refused} == {(dead.url, "breaker_open")}
    assert all(e.retry_after >= 1 for e in refused)
    assert isinstance(errors[0], httpx.ConnectError)
    origin = origin_of(transport, dead.url)
    assert origin["breaker"]["state"] == "open"
    assert origin["refused"]["breaker_open"] == 999
    assert (origin["failures_total"], origin["retries_total"]) == (5, 4)


async def test_dead_origin_under_concurrency(guard: gr.Guardrails, dead: Upstream) -> None:
    counting = Counting()
    transport = gr.GuardedTransport(
        counting,
        guard=guard,
        breaker=gr.BreakerSettings(fail_max=5, reset_timeout=30),
        max_concurrency=10,
        queue_timeout=5,
    )
    outcomes: list[type[Exception]] = []

    async def call(http: httpx.AsyncClient) -> None:
        try:
            await http.get(dead.url + "/")
        except Exception as exc:
            outcomes.append(type(exc))

    async with client(transport) as http, anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(call, http)
    assert len(outcomes) == 1000
    assert set(outcomes) <= {httpx.ConnectError, gr.OriginUnavailable}
    # Besides the fail_max that opened it, only attempts already in flight then.
    assert 5 <= counting.attempts <= 5 + 10
    assert origin_of(transport, dead.url)["in_flight"] == 0


async def test_half_open_lets_exactly_one_trial_through(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(
        guard=guard,
        breaker=gr.BreakerSettings(fail_max=3, reset_timeout=0.2),
        retry=gr.RetrySettings(attempts=1),
    )
    results: list[int | str] = []

    async def call(http: httpx.AsyncClient) -> None:
        try:
            results.append((await http.get(upstream.url + "/gate/trial")).status_code)
        except gr.OriginUnavailable as exc:
            results.append(exc.reason)

    async with client(transport) as http:
        for _ in range(3):
            await http.get(upstream.url + "/status/502")
        with pytest.raises(gr.OriginUnavailable):
            await http.get(upstream.url + "/refused-while-open")
        assert upstream.hits["/refused-while-open"] == 0  # no connection was even tried
        await anyio.sleep(0.25)  # the open period ends; the next call is the trial
        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(call, http)
            await wait_until(lambda: len(results) == 99 and upstream.hits["/gate/trial"] == 1)
            upstream.open_gate("trial")
        assert upstream.hits["/gate/trial"] == 1
        assert sorted(map(str, results)) == ["200"] + ["breaker_open"] * 99
        assert origin_of(transport, upstream.url)["breaker"]["state"] == "closed"
        assert (await http.get(upstream.url + "/gate/trial")).status_code == 200


async def test_origins_do_not_share_a_breaker(
    guard: gr.Guardrails, upstream: Upstream, dead: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard, breaker=gr.BreakerSettings(fail_max=2))
    async with client(transport) as http:
        for _ in range(5):
            with pytest.raises((httpx.ConnectError, gr.OriginUnavailable)):
                await http.get(dead.url + "/")
        for _ in range(5):
            assert (await http.get(upstream.url + "/ok")).status_code == 200
    assert origin_of(transport, dead.url)["breaker"]["state"] == "open"
    healthy = origin_of(transport, upstream.url)
    assert healthy["breaker"]["state"] == "closed"
    assert (healthy["failures_total"], healthy["refused"]["breaker_open"]) == (0, 0)


async def test_idle_origins_make_room_for_new_ones(guard: gr.Guardrails) -> None:
    ports = [Upstream(listen=False) for _ in range(257)]
    try:
        transport = gr.GuardedTransport(
            guard=guard, breaker=gr.BreakerSettings(fail_max=2), retry=gr.RetrySettings(attempts=1)
        )
        async with client(transport) as http:
            for i, port in enumerate(ports):
                for _ in range(2 if i == 0 else 1):  # the first origin's breaker opens
                    with pytest.raises(httpx.ConnectError):
                        await http.get(port.url)
        known = [origin["origin"] for origin in transport.snapshot()["origins"]]
    finally:
        for port in ports:
            port.stop()
    assert len(known) == 256
    # The open one is remembered; the oldest idle one made room for the newest.
    assert ports[0].url in known
    assert ports[1].url not in known
    assert ports[256].url in known


async def test_answers_are_not_outages(guard: gr.Guardrails, upstream: Upstream) -> None:
    transport = gr.GuardedTransport(
        guard=guard, breaker=gr.BreakerSettings(fail_max=2), retry=gr.RetrySettings(attempts=1)
    )
    async with client(transport) as http:
        for status in (404, 500, 400, 500, 429):
            assert (await http.get(f"{upstream.url}/status/{status}")).status_code == status
    origin = origin_of(transport, upstream.url)
    assert (origin["breaker"]["state"], origin["failures_total"]) == ("closed", 0)


async def test_failure_statuses_and_classifiers_are_configurable(
    guard: gr.Guardrails, upstream: Upstream, dead: Upstream
) -> None:
    def refused_is_fine(exc: BaseException) -> gr.ErrorKind | None:
        return gr.ErrorKind.APP if isinstance(exc, httpx.ConnectError) else None

    transport = gr.GuardedTransport(
        guard=guard,
        breaker=gr.BreakerSettings(fail_max=2, classifiers=(refused_is_fine,)),
        retry=gr.RetrySettings(attempts=1),
        failure_statuses=(500,),
    )
    async with client(transport) as http:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                await http.get(dead.url + "/")
        for _ in range(2):
            assert (await http.get(upstream.url + "/status/500")).status_code == 500
    assert origin_of(transport, dead.url)["breaker"]["state"] == "closed"
    assert origin_of(transport, upstream.url)["breaker"]["state"] == "open"


# -- retries ------------------------------------------------------------------------------


async def test_get_is_retried_through_a_brief_failure(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard, retry=gr.RetrySettings(attempts=3))
    async with client(transport) as http:
        response = await http.get(upstream.url + "/flaky/get?fail=2&status=503")
    assert response.status_code == 200
    assert upstream.hits["/flaky/get"] == 3
    origin = origin_of(transport, upstream.url)
    assert (origin["retries_total"], origin["retry"]["retries_total"]) == (2, 2)


async def test_get_is_retried_until_the_origin_listens(guard: gr.Guardrails) -> None:
    late = Upstream(listen=False)
    try:

        async def start_listening() -> None:
            if not late.listening:
                await anyio.to_thread.run_sync(late.start)

        counting = Counting(after_failure=start_listening)
        transport = gr.GuardedTransport(counting, guard=guard)
        async with client(transport) as http:
            response = await http.get(late.url + "/ok")
        assert response.status_code == 200
        assert (counting.attempts, counting.failures, late.hits["/ok"]) == (2, 1, 1)
    finally:
        late.stop()


async def test_post_is_never_retried_once_its_body_was_sent(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard, retry=gr.RetrySettings(attempts=3))
    async with client(transport, timeout=httpx.Timeout(5, read=0.2)) as http:
        answered = await http.post(upstream.url + "/flaky/post?fail=5", content=b"order 1")
        with pytest.raises(httpx.ReadTimeout):
            await http.post(upstream.url + "/gate/post", content=b"order 2")
    upstream.open_gate("post")
    assert answered.status_code == 503
    assert upstream.bodies["/flaky/post"] == [b"order 1"]
    assert upstream.bodies["/gate/post"] == [b"order 2"]
    assert origin_of(transport, upstream.url)["retries_total"] == 0


async def test_idempotency_key_makes_a_post_retryable(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard, retry=gr.RetrySettings(attempts=3))
    async with client(transport) as http:
        response = await http.post(
            upstream.url + "/flaky/keyed?fail=2",
            content=b"order 3",
            headers={"Idempotency-Key": "order-3"},
        )
    assert response.status_code == 200
    assert upstream.bodies["/flaky/keyed"] == [b"order 3"] * 3


async def test_a_streamed_body_is_not_replayed(guard: gr.Guardrails, upstream: Upstream) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"part 1, "
        yield b"part 2"

    transport = gr.GuardedTransport(guard=guard, retry=gr.RetrySettings(attempts=3))
    async with client(transport) as http:
        response = await http.put(upstream.url + "/flaky/stream?fail=2", content=body())
    assert response.status_code == 503
    assert upstream.bodies["/flaky/stream"] == [b"part 1, part 2"]


async def test_any_method_is_retried_when_the_connection_failed(
    guard: gr.Guardrails, dead: Upstream
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"never sent"

    counting = Counting()
    transport = gr.GuardedTransport(
        counting,
        guard=guard,
        breaker=gr.BreakerSettings(fail_max=100),
        retry=gr.RetrySettings(attempts=3),
    )
    async with client(transport) as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(dead.url + "/", content=b"order 4")
        with pytest.raises(httpx.ConnectError):
            await http.post(dead.url + "/", content=body())
    assert counting.attempts == 6


async def test_retry_after_is_honoured(guard: gr.Guardrails, upstream: Upstream) -> None:
    transport = gr.GuardedTransport(
        guard=guard, retry=gr.RetrySettings(attempts=2, base_delay=0.01, max_delay=2)
    )
    async with client(transport) as http:
        response = await http.get(upstream.url + "/flaky/later?fail=1&status=429&retry_after=1")
    assert response.status_code == 200
    first, second = upstream.arrivals["/flaky/later"]
    assert second - first >= 1.0  # never sooner than the origin asked


async def test_retry_after_longer_than_a_retry_may_wait_is_not_waited_for(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard, retry=gr.RetrySettings(attempts=3, max_delay=1))
    async with client(transport) as http:
        response = await http.get(upstream.url + "/flaky/much-later?fail=1&retry_after=5")
        deadline = anyio.current_time() + 0.5
        token = context.enter(context.CallContext("/route", Outcome(guard), deadline=deadline))
        try:
            inside = await http.get(upstream.url + "/flaky/past-deadline?fail=1&retry_after=1")
        finally:
            context.leave(token)
    assert (response.status_code, response.headers["retry-after"]) == (503, "5")
    assert upstream.hits["/flaky/much-later"] == 1
    # Retry-After 1 s fits max_delay, but not the 0.5 s the request has left.
    assert inside.status_code == 503
    assert upstream.hits["/flaky/past-deadline"] == 1


async def test_retries_stay_within_the_budget(guard: gr.Guardrails, upstream: Upstream) -> None:
    transport = gr.GuardedTransport(
        guard=guard,
        breaker=gr.BreakerSettings(fail_max=1000),
        retry=gr.RetrySettings(attempts=3, base_delay=0.001, budget_ratio=0, budget_min_retries=4),
    )
    async with client(transport) as http:
        for _ in range(10):
            assert (await http.get(upstream.url + "/status/503")).status_code == 503
    origin = origin_of(transport, upstream.url)
    assert origin["retries_total"] == 4
    assert origin["attempts_total"] == 14
    assert origin["retry"]["denied_total"] == 8


# -- the inbound request's deadline -------------------------------------------------------


class inside_request:
    """The state GuardrailsMiddleware gives a request with ``Policy(timeout=seconds)``."""

    def __init__(self, seconds: float) -> None:
        self.deadline = anyio.current_time() + seconds

    def __enter__(self) -> float:
        self.token = context.enter(
            context.CallContext(
                "/route", Outcome(gr.Guardrails(concurrency=1)), deadline=self.deadline
            )
        )
        return self.deadline

    def __exit__(self, *exc: object) -> None:
        context.leave(self.token)


async def test_a_call_ends_at_the_request_deadline(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard)
    # No timeout of its own: only the request's deadline can end this call.
    async with client(transport, timeout=None) as http:
        with anyio.fail_after(10), inside_request(0.3) as deadline:
            with pytest.raises(gr.OriginUnavailable) as raised:
                await http.get(upstream.url + "/gate/deadline")
            ended = anyio.current_time()
    assert raised.value.reason == "deadline"
    assert ended >= deadline
    assert (upstream.hits["/gate/deadline"], upstream.answered["/gate/deadline"]) == (1, 0)
    upstream.open_gate("deadline")
    origin = origin_of(transport, upstream.url)
    # Cut short by the request, not failed by the origin: nothing counted, nothing retried.
    assert (origin["failures_total"], origin["breaker"]["failures"]) == (0, 0)
    assert (origin["refused"]["deadline"], origin["retries_total"]) == (1, 0)


async def test_the_deadline_caps_the_clients_own_timeouts(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard)
    async with client(transport, timeout=30) as http:
        with (
            anyio.fail_after(10),
            inside_request(0.3),
            pytest.raises(gr.OriginUnavailable) as raised,
        ):
            await http.get(upstream.url + "/gate/capped")
    assert raised.value.reason == "deadline"
    assert upstream.answered["/gate/capped"] == 0
    upstream.open_gate("capped")


async def test_a_body_cannot_outlast_the_request_deadline(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard, max_concurrency=1)
    async with client(transport, timeout=None) as http:
        with anyio.fail_after(10), inside_request(0.5):
            async with http.stream("GET", upstream.url + "/drip/body") as response:
                assert response.status_code == 200
                chunks = response.aiter_raw()
                assert await chunks.__anext__() == b"part 1, "
                with pytest.raises(gr.OriginUnavailable) as raised:
                    await chunks.__anext__()
    assert raised.value.reason == "deadline"
    assert upstream.answered["/drip/body"] == 0
    upstream.open_gate("body")
    assert origin_of(transport, upstream.url)["in_flight"] == 0


async def test_a_call_past_the_deadline_is_not_started(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    counting = Counting()
    transport = gr.GuardedTransport(counting, guard=guard)
    async with client(transport) as http:
        with inside_request(0), pytest.raises(gr.OriginUnavailable) as raised:
            await http.get(upstream.url + "/too-late")
    assert raised.value.reason == "deadline"
    assert counting.attempts == 0
    assert upstream.hits["/too-late"] == 0


async def test_the_time_left_can_be_sent_downstream(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard, deadline_header="X-Deadline-Ms")
    async with client(transport) as http:
        with inside_request(2.0):
            inside = (await http.get(upstream.url + "/headers")).json()
        outside = (await http.get(upstream.url + "/headers")).json()
    assert 0 < int(inside["x-deadline-ms"]) <= 2000
    assert "x-deadline-ms" not in outside


# -- the bulkhead -------------------------------------------------------------------------


async def test_max_concurrency_per_origin(guard: gr.Guardrails, upstream: Upstream) -> None:
    transport = gr.GuardedTransport(guard=guard, max_concurrency=2, queue_timeout=0.05)
    statuses: list[int] = []

    async def call(http: httpx.AsyncClient, path: str) -> None:
        statuses.append((await http.get(upstream.url + path)).status_code)

    async with client(transport) as http, anyio.create_task_group() as tg:
        tg.start_soon(call, http, "/gate/bulkhead")
        tg.start_soon(call, http, "/gate/bulkhead")
        await wait_until(lambda: upstream.hits["/gate/bulkhead"] == 2)
        with pytest.raises(gr.Shed) as raised:
            await http.get(upstream.url + "/gate/bulkhead")
        assert isinstance(raised.value, gr.OriginUnavailable)
        assert (raised.value.reason, raised.value.origin) == ("queue_timeout", upstream.url)
        assert origin_of(transport, upstream.url)["in_flight"] == 2
        upstream.open_gate("bulkhead")
    assert statuses == [200, 200]
    assert upstream.hits["/gate/bulkhead"] == 2
    origin = origin_of(transport, upstream.url)
    assert (origin["in_flight"], origin["refused"]["queue_timeout"]) == (0, 1)


async def test_a_waiting_call_goes_when_a_place_frees(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard, max_concurrency=1, queue_timeout=30)
    order: list[str] = []

    async def call(http: httpx.AsyncClient, path: str) -> None:
        await http.get(upstream.url + path)
        order.append(path)

    async with client(transport) as http, anyio.create_task_group() as tg:
        tg.start_soon(call, http, "/gate/first")
        await wait_until(lambda: upstream.hits["/gate/first"] == 1)
        tg.start_soon(call, http, "/second")
        await anyio.sleep(0.05)
        assert upstream.hits["/second"] == 0  # waiting for the one place
        upstream.open_gate("first")
    assert order == ["/gate/first", "/second"]


async def test_a_streamed_response_holds_its_place_until_closed(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(guard=guard, max_concurrency=1, queue_timeout=0)
    async with client(transport) as http:
        async with http.stream("GET", upstream.url + "/ok") as response:
            assert origin_of(transport, upstream.url)["in_flight"] == 1
            with pytest.raises(gr.OriginUnavailable):
                await http.get(upstream.url + "/ok")
            assert await response.aread() == b"ok"
        assert origin_of(transport, upstream.url)["in_flight"] == 0
        assert (await http.get(upstream.url + "/ok")).status_code == 200


# -- what the guard shows -----------------------------------------------------------------


async def open_origin(transport: gr.GuardedTransport, url: str) -> None:
    async with client(transport) as http:
        for _ in range(transport.settings.breaker.fail_max):
            with pytest.raises(httpx.ConnectError):
                await http.get(url)


async def test_health_shows_each_origin_and_never_fails_for_it(
    guard: gr.Guardrails, upstream: Upstream, dead: Upstream
) -> None:
    transport = gr.GuardedTransport(
        guard=guard,
        name="partner",
        breaker=gr.BreakerSettings(fail_max=2),
        retry=gr.RetrySettings(attempts=1),
    )
    async with client(transport) as http:
        assert (await http.get(upstream.url + "/ok")).status_code == 200
    await open_origin(transport, dead.url)
    app = httpx.ASGITransport(app=guard.health)
    async with httpx.AsyncClient(transport=app, base_url="http://app") as health:
        full = await health.get("/")
        live = await httpx.AsyncClient(
            transport=httpx.ASGITransport(app=guard.health.live), base_url="http://app"
        ).get("/")
        ready = await httpx.AsyncClient(
            transport=httpx.ASGITransport(app=guard.health.ready), base_url="http://app"
        ).get("/")
    assert (full.status_code, live.status_code, ready.status_code) == (200, 200, 200)
    report = full.json()
    assert report["status"] == "warn"
    down = report["checks"][f"outbound:partner:{dead.url}"][0]
    assert (down["observedValue"], down["status"], down["retryAfter"]) == ("open", "warn", 30)
    up = report["checks"][f"outbound:partner:{upstream.url}"][0]
    assert (up["observedValue"], up["status"]) == ("closed", "pass")
    assert f"{dead.url}: circuit breaker open" in report["output"]
    assert report["checks"]["breaker:state"][0]["observedValue"] == "closed"


async def test_breaker_transitions_reach_telemetry(guard: gr.Guardrails, dead: Upstream) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    guard.telemetry.add_sink(lambda event, fields: events.append((event, fields)))
    transport = gr.GuardedTransport(
        guard=guard, breaker=gr.BreakerSettings(fail_max=2), retry=gr.RetrySettings(attempts=1)
    )
    await open_origin(transport, dead.url)
    outbound = [fields for event, fields in events if event == "outbound_breaker_state"]
    assert [(f["origin"], f["client"], f["old"], f["new"]) for f in outbound] == [
        (dead.url, "default", "closed", "open")
    ]
    assert not [event for event, _ in events if event == "breaker_state"]


async def test_prometheus_shows_outbound_calls_per_origin(
    guard: gr.Guardrails, upstream: Upstream, dead: Upstream
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from test_prometheus import samples

    from guardrails.prometheus import GuardrailsCollector

    registry = CollectorRegistry()
    registry.register(GuardrailsCollector(guard))
    transport = gr.GuardedTransport(
        guard=guard, breaker=gr.BreakerSettings(fail_max=2), retry=gr.RetrySettings(attempts=2)
    )
    async with client(transport) as http:
        assert (await http.get(upstream.url + "/flaky/metrics?fail=1")).status_code == 200
        for _ in range(3):
            with pytest.raises((httpx.ConnectError, gr.OriginUnavailable)):
                await http.get(dead.url + "/")
    found = samples(generate_latest(registry).decode())

    def value(name: str, origin: str, **labels: str) -> float:
        key = tuple(sorted({"client": "default", "origin": origin, **labels}.items()))
        return found[(name, key)]

    assert value("guardrails_outbound_calls_total", upstream.url) == 1
    assert value("guardrails_outbound_attempts_total", upstream.url) == 2
    assert value("guardrails_outbound_retries_total", upstream.url) == 1
    assert value("guardrails_outbound_failures_total", upstream.url) == 1
    assert value("guardrails_outbound_latency_seconds_count", upstream.url) == 1
    assert value("guardrails_outbound_breaker_state", upstream.url, state="closed") == 1
    assert value("guardrails_outbound_calls_total", dead.url) == 3
    assert value("guardrails_outbound_attempts_total", dead.url) == 2
    assert value("guardrails_outbound_refused_total", dead.url, reason="breaker_open") == 2
    assert value("guardrails_outbound_breaker_state", dead.url, state="open") == 1
    assert value("guardrails_outbound_in_flight", dead.url) == 0


# -- inside an app behind GuardrailsMiddleware --------------------------------------------


async def test_inside_a_guarded_route(
    guard: gr.Guardrails, upstream: Upstream, dead: Upstream
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    transport = gr.GuardedTransport(
        guard=guard,
        breaker=gr.BreakerSettings(fail_max=2),
        retry=gr.RetrySettings(attempts=1),
        deadline_header="x-deadline-ms",
    )
    outbound = httpx.AsyncClient(transport=transport)

    @gr.policy(timeout=5)
    async def headers(request: Request) -> Response:
        return JSONResponse((await outbound.get(upstream.url + "/headers")).json())

    async def partner(request: Request) -> Response:
        try:
            await outbound.get(dead.url + "/")
        except gr.OriginUnavailable as exc:
            return JSONResponse({"error": exc.reason}, status_code=503)
        except httpx.ConnectError:
            return JSONResponse({"error": "unreachable"}, status_code=502)
        return JSONResponse({})

    app = Starlette(routes=[Route("/headers", headers), Route("/partner", partner)])
    app.add_middleware(gr.GuardrailsMiddleware, guard=guard)
    async with (
        outbound,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http,
    ):
        sent = (await http.get("/headers")).json()
        answers = [(await http.get("/partner")).json()["error"] for _ in range(4)]
    # The route's deadline reached the upstream; the partner's outage stayed the partner's.
    assert 0 < int(sent["x-deadline-ms"]) <= 5000
    assert answers == ["unreachable", "unreachable", "breaker_open", "breaker_open"]
    assert guard.limiter.in_flight == 0


class Remembering(httpx.AsyncBaseTransport):
    """A user's cache in front of the real transport: its answers are read in full."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: dict[str, bytes] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = self.seen.get(str(request.url))
        if body is None:
            response = await self.inner.handle_async_request(request)
            body = self.seen[str(request.url)] = await response.aread()
            await response.aclose()
        return httpx.Response(200, content=body)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_answer_read_in_full_gives_its_place_back_at_once(
    guard: gr.Guardrails, upstream: Upstream
) -> None:
    transport = gr.GuardedTransport(Remembering(), guard=guard, max_concurrency=1, queue_timeout=0)
    async with client(transport) as http:
        for _ in range(3):
            assert (await http.get(upstream.url + "/remembered")).text == "ok"
    assert upstream.hits["/remembered"] == 1
    assert origin_of(transport, upstream.url)["in_flight"] == 0


# -- behind the middleware ------------------------------------------------------------------


async def test_an_origin_refusal_escaping_a_route_is_a_503_with_its_retry_after(
    guard: gr.Guardrails, dead: Upstream
) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    transport = gr.GuardedTransport(
        guard=guard,
        breaker=gr.BreakerSettings(fail_max=1, reset_timeout=30),
        retry=gr.RetrySettings(attempts=1),
    )
    partner = httpx.AsyncClient(transport=transport)

    @gr.policy(stale_ttl=600)
    async def plain(request: Request) -> Response:
        await partner.get(dead.url + "/plain")
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/plain", plain)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=asgi, base_url="http://app") as http, partner:
        # The route's own 500 while the origin's breaker is still closed (a ConnectError).
        assert (await http.get("/plain")).status_code == 500
        refused = await http.get("/plain")  # the breaker is open now: refused at once
        assert refused.status_code == 503
        assert refused.json()["error"] == "unavailable"
        assert int(refused.headers["retry-after"]) >= 25
    # Nothing reached the database breaker (the guard fixture checks it too).
    assert guard.breaker.state == "closed"
