"""guardrails.testing.FaultTransport: origin faults that GuardedTransport treats as the real ones.

Each fault is compared with the real thing on loopback (a closed port, a real upstream
answering 503 with Retry-After), through the same GuardedTransport settings: the caller
sees the same exception or answer, and the origin's counters and breaker move the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from upstream import Upstream

import guardrails as gr
from guardrails.testing import FaultTransport, InstantRetries

pytestmark = pytest.mark.anyio


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


def guarded(inner: httpx.AsyncBaseTransport | None = None) -> gr.GuardedTransport:
    return gr.GuardedTransport(
        inner,
        breaker=gr.BreakerSettings(fail_max=6, reset_timeout=30),
        retry=gr.RetrySettings(attempts=3, max_delay=1.0, budget_min_retries=100),
    )


def counters(transport: gr.GuardedTransport) -> dict[str, Any]:
    (origin,) = transport.snapshot()["origins"]
    keep = ("in_flight", "calls_total", "attempts_total", "failures_total", "retries_total")
    return {
        "breaker": (origin["breaker"]["state"], origin["breaker"]["failures"]),
        **{key: origin[key] for key in keep},
    }


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"0123456789")


async def test_a_refused_connection_is_the_one_a_closed_port_gives(
    dead: Upstream, guardrails_instant_retries: InstantRetries
) -> None:
    faulty = FaultTransport(httpx.MockTransport(ok), refuse=1.0)
    seen: dict[str, Any] = {}
    for name, transport in (("real", guarded()), ("injected", guarded(faulty))):
        async with httpx.AsyncClient(transport=transport) as client:
            errors = []
            for method in ("GET", "POST"):  # never sent: retried whatever the method
                with pytest.raises(httpx.TransportError) as caught:
                    await client.request(method, f"{dead.url}/ok", content=b"x")
                errors.append(type(caught.value))
            refused_now = None
            try:
                await client.get(f"{dead.url}/ok")
            except gr.OriginUnavailable as exc:
                refused_now = (exc.reason, exc.retry_after)
            seen[name] = (errors, refused_now, counters(transport))
    assert seen["injected"] == seen["real"]
    errors, refused_now, moved = seen["real"]
    assert errors == [httpx.ConnectError, httpx.ConnectError]
    assert refused_now == ("breaker_open", 30)
    assert moved["breaker"] == ("open", 6)
    assert faulty.refused == 6  # three tries each; the third call never left: breaker open


async def test_a_503_with_retry_after_is_retried_as_the_real_one(
    upstream: Upstream, guardrails_instant_retries: InstantRetries
) -> None:
    faulty = FaultTransport(httpx.MockTransport(ok), unavailable=1.0, retry_after=1)
    seen: dict[str, Any] = {}
    for name, transport, url in (
        ("real", guarded(), f"{upstream.url}/status/503?retry_after=1"),
        ("injected", guarded(faulty), f"{upstream.url}/ok"),
    ):
        waits_before = len(guardrails_instant_retries.waits)
        async with httpx.AsyncClient(transport=transport) as client:
            answer = await client.get(url)
        waits = guardrails_instant_retries.waits[waits_before:]
        seen[name] = (
            answer.status_code,
            answer.headers["retry-after"],
            [wait >= 1.0 for wait in waits],  # never sooner than Retry-After asked
            counters(transport),
        )
    assert seen["injected"] == seen["real"]
    assert seen["real"][:3] == (503, "1", [True, True])
    assert faulty.answered_unavailable == 3


async def read_into(response: httpx.Response, received: list[bytes]) -> None:
    async for chunk in response.aiter_bytes():
        received.append(chunk)


async def test_a_reset_breaks_the_body_off_and_gives_the_place_back(upstream: Upstream) -> None:
    faulty = FaultTransport(httpx.AsyncHTTPTransport(), reset=1.0)
    transport = guarded(faulty)
    async with httpx.AsyncClient(transport=transport) as client:
        async with client.stream("GET", f"{upstream.url}/ok") as response:
            assert response.status_code == 200
            received: list[bytes] = []
            with pytest.raises(httpx.ReadError, match="reset"):
                await read_into(response, received)
        assert received == [b"o"]  # half of the first chunk, "ok"
        with pytest.raises(httpx.ReadError):
            await client.get(f"{upstream.url}/ok")
    assert faulty.resets == 2
    moved = counters(transport)
    # The answer had started: no outage for the breaker, and the bulkhead place is back.
    assert moved["breaker"] == ("closed", 0)
    assert moved["in_flight"] == 0


async def test_a_slow_call_can_be_cancelled_while_it_waits() -> None:
    calls: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200)

    faulty = FaultTransport(httpx.MockTransport(record), delay=60)
    async with httpx.AsyncClient(transport=faulty) as client:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await client.get("http://origin.test/")
        assert scope.cancelled_caught
        unhurried = FaultTransport(httpx.MockTransport(record), delay=0.01, slow=0.0)
        async with httpx.AsyncClient(transport=unhurried) as other:
            assert (await other.get("http://origin.test/")).status_code == 200
    assert (faulty.slowed, unhurried.slowed, len(calls)) == (1, 0, 1)


async def test_each_rate_is_within_three_sigma_over_10000_calls() -> None:
    n = 10_000
    rates = {"refused": 0.1, "answered_unavailable": 0.2, "resets": 0.05, "slowed": 0.3}
    faulty = FaultTransport(
        httpx.MockTransport(ok),
        refuse=rates["refused"],
        unavailable=rates["answered_unavailable"],
        reset=rates["resets"],
        slow=rates["slowed"],
        delay=1e-9,
        seed=99,
    )
    seen = {"refused": 0, "answered_unavailable": 0, "resets": 0}
    for _ in range(n):
        try:
            response = await faulty.handle_async_request(httpx.Request("GET", "http://o.test/"))
            body = b"".join([chunk async for chunk in response.stream])
        except httpx.ConnectError:
            seen["refused"] += 1
        except httpx.ReadError:
            seen["resets"] += 1
        else:
            seen["answered_unavailable"] += response.status_code == 503
            assert body in (b"0123456789", b'{"error": "unavailable"}')
    assert faulty.calls == n
    for name, p in rates.items():
        count = getattr(faulty, name)
        assert seen.get(name, count) == count
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= 3 * sigma, (name, count, n * p, sigma)


async def test_the_same_seed_fails_the_same_calls() -> None:
    async def outcomes(seed: int) -> list[int]:
        faulty = FaultTransport(httpx.MockTransport(ok), refuse=0.3, unavailable=0.3, seed=seed)
        found = []
        for _ in range(100):
            try:
                found.append(
                    (
                        await faulty.handle_async_request(httpx.Request("GET", "http://o/"))
                    ).status_code
                )
            except httpx.ConnectError:
                found.append(0)
        return found

    assert await outcomes(5) == await outcomes(5)
    assert await outcomes(5) != await outcomes(6)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"refuse": 0.6, "unavailable": 0.6}, ValueError, "at most 1"),
        ({"reset": -0.1}, ValueError, "between 0 and 1"),
        ({"retry_after": 1.5}, ValueError, "whole seconds"),
        ({"delay": "1s"}, TypeError, "number of seconds or a timedelta"),
        ({"seed": "x"}, TypeError, "seed must be an int"),
    ],
)
def test_bad_settings_are_refused(
    kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        FaultTransport(httpx.MockTransport(ok), **kwargs)
    with pytest.raises(TypeError, match="AsyncBaseTransport"):
        FaultTransport(object())  # type: ignore[arg-type]
