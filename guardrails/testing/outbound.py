"""Outbound faults: an httpx transport that makes another fail like a struggling origin.

:class:`FaultTransport` wraps the transport that makes the connections (put it inside
a :class:`~guardrails.GuardedTransport`): at the rates given, a call is refused the
way httpx reports a refused connection, slowed, answered 503 with ``Retry-After``
by the "origin", or cut off in the middle of its body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import httpx

from guardrails.testing.rates import Draw, rate, seconds, seed_of

__all__ = ["FaultTransport"]

_UNAVAILABLE_BODY = b'{"error": "unavailable"}'


class FaultTransport(httpx.AsyncBaseTransport):
    """An httpx transport that injects origin faults into another, at rates, from a seed.

    ::

        faulty = FaultTransport(httpx.AsyncHTTPTransport(), refuse=0.2, seed=7)
        client = httpx.AsyncClient(transport=gr.GuardedTransport(faulty, guard=guard))

    For each request, one draw decides among (rates that add up to at most 1):

    - ``refuse``: no connection; raises ``httpx.ConnectError`` as httpx does for a
      refused connection, and the request never reaches ``transport``;
    - ``unavailable``: the origin answers 503 with ``Retry-After: retry_after``
      (``None``: no header) without reaching ``transport``;
    - ``reset``: ``transport`` answers, and its body breaks off half-way through the
      first chunk with ``httpx.ReadError`` (a connection reset by the peer);
    - otherwise the request goes to ``transport`` untouched.

    Before that, a share ``slow`` of requests waits ``delay`` seconds (cancellable,
    like a slow network). The counters say what was injected.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        refuse: float = 0.0,
        unavailable: float = 0.0,
        reset: float = 0.0,
        retry_after: int | None = 1,
        delay: float | timedelta = 0.0,
        slow: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(
                f"transport must be an httpx.AsyncBaseTransport such as "
                f"httpx.AsyncHTTPTransport(), not {transport!r}"
            )
        self.refuse = rate("refuse", refuse)
        self.unavailable = rate("unavailable", unavailable)
        self.reset = rate("reset", reset)
        if self.refuse + self.unavailable + self.reset > 1.0 + 1e-9:
            raise ValueError(
                f"refuse + unavailable + reset must be at most 1 (each call gets at most "
                f"one of them), not {self.refuse + self.unavailable + self.reset:g}"
            )
        if retry_after is not None and (
            isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0
        ):
            raise ValueError(f"retry_after must be whole seconds >= 0 or None, not {retry_after!r}")
        self.retry_after = retry_after
        self.delay = seconds("delay", delay)
        self.slow = rate("slow", slow)
        self.inner = transport if transport is not None else httpx.AsyncHTTPTransport()
        """The transport faults are injected into."""
        self._draw = Draw(seed_of(seed))
        self.calls = 0
        """Requests handled."""
        self.refused = 0
        """Requests refused with ``ConnectError``."""
        self.answered_unavailable = 0
        """Requests answered 503 by the fault."""
        self.resets = 0
        """Responses whose body was cut off."""
        self.slowed = 0
        """Requests delayed."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through ``transport``, or fail it as the draw says."""
        self.calls += 1
        if self.delay > 0 and self._draw.hit(self.slow):
            self.slowed += 1
            await anyio.sleep(self.delay)
        faults = self.refuse + self.unavailable + self.reset
        pick = self._draw.uniform() if faults > 0 else 1.0
        if pick < self.refuse:
            self.refused += 1
            raise httpx.ConnectError("All connection attempts failed", request=request)
        if pick < self.refuse + self.unavailable:
            self.answered_unavailable += 1
            headers = [(b"content-type", b"application/json")]
            if self.retry_after is not None:
                headers.append((b"retry-after", str(self.retry_after).encode()))
            return httpx.Response(
                503, headers=headers, stream=httpx.ByteStream(_UNAVAILABLE_BODY), request=request
            )
        response = await self.inner.handle_async_request(request)
        if pick < faults:
            self.resets += 1
            response.stream = _ResetBody(response.stream, request)
        return response

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.inner.aclose()


class _ResetBody(httpx.AsyncByteStream):
    """A body that breaks off half-way through its first chunk, like a reset connection."""

    def __init__(self, inner: Any, request: httpx.Request) -> None:
        self.inner = inner
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            half = chunk[: len(chunk) // 2]
            if half:
                yield half
            break
        raise httpx.ReadError("[Errno 104] Connection reset by peer", request=self.request)

    async def aclose(self) -> None:
        await self.inner.aclose()
