"""``GuardedTransport``: an httpx transport that guards outbound calls like database calls.

It wraps another ``httpx.AsyncBaseTransport`` (by default ``httpx.AsyncHTTPTransport()``)
and gives every origin it calls a breaker, a bulkhead, a retry budget and counters
(:mod:`guardrails.outbound.origin`); each request is one
:class:`~guardrails.outbound.call.Call`. Given a guard, it reports to the guard's
snapshot, health endpoint, telemetry and metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import httpx

from guardrails import context
from guardrails.breaker import BreakerSettings
from guardrails.guard import Guardrails
from guardrails.outbound.call import Call
from guardrails.outbound.origin import Origin, origin_label
from guardrails.outbound.settings import OutboundSettings, seconds, statuses
from guardrails.retry import RetrySettings

__all__ = ["GuardedTransport"]

_MAX_ORIGINS = 256
"""Origins kept before idle ones (breaker closed, nothing in flight) are dropped."""


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport with a circuit breaker, retries and a bulkhead per origin.

    ::

        client = httpx.AsyncClient(transport=gr.GuardedTransport(guard=guard))

    Each origin (scheme, host, port) gets its own breaker (``breaker``, a
    :class:`~guardrails.BreakerSettings`): connect errors, timeouts, dropped connections
    and ``failure_statuses`` count as outages, and while it is open calls fail at once
    with :class:`~guardrails.OriginUnavailable` without a connection being tried.
    Idempotent requests (GET, HEAD, OPTIONS, PUT, DELETE, or any carrying an
    ``Idempotency-Key``) with a body held in memory are retried (``retry``, a
    :class:`~guardrails.RetrySettings`) on those failures and on ``retry_statuses``,
    honouring ``Retry-After``; any request is retried when the connection could not be
    made. ``max_concurrency`` limits the calls in flight per origin; others wait up to
    ``queue_timeout`` seconds, then fail with ``OriginUnavailable`` (a ``gr.Shed``).

    Inside a request guarded by :class:`~guardrails.GuardrailsMiddleware`, no call or
    retry runs past the request's deadline; ``deadline_header`` sends the time left
    (milliseconds) to the origin. With ``guard``, the origins show in
    ``guard.snapshot()``, ``guard.health`` and the Prometheus collector under ``name``,
    which must be unique among the guard's transports.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        guard: Guardrails | None = None,
        name: str = "default",
        breaker: BreakerSettings | None = None,
        retry: RetrySettings | None = None,
        max_concurrency: int | None = None,
        queue_timeout: float | timedelta = 0.1,
        failure_statuses: Iterable[int] = (502, 503, 504),
        retry_statuses: Iterable[int] = (429, 502, 503, 504),
        deadline_header: str | None = None,
    ) -> None:
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(
                f"transport must be an httpx.AsyncBaseTransport such as "
                f"httpx.AsyncHTTPTransport(retries=0), not {transport!r}"
            )
        if guard is not None and not isinstance(guard, Guardrails):
            raise TypeError(f"guard must be a guardrails Guardrails, not {guard!r}")
        self.settings = OutboundSettings(
            name=name,
            breaker=breaker if breaker is not None else BreakerSettings(),
            retry=retry if retry is not None else RetrySettings(),
            max_concurrency=max_concurrency,
            queue_timeout=seconds("queue_timeout", queue_timeout),
            failure_statuses=statuses("failure_statuses", failure_statuses),
            retry_statuses=statuses("retry_statuses", retry_statuses),
            deadline_header=deadline_header,
        )
        self.inner = transport if transport is not None else httpx.AsyncHTTPTransport()
        """The transport that makes the connections."""
        self.guard = guard
        self.closed = False
        """Whether :meth:`aclose` was called."""
        self._origins: dict[tuple[str, bytes], Origin] = {}
        if guard is not None:
            guard.register_outbound(self)

    @property
    def name(self) -> str:
        """The client's name in the guard's snapshot, health checks and metrics."""
        return self.settings.name

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the origin's breaker, bulkhead and retries."""
        url = request.url
        origin = self._origins.get((url.scheme, url.netloc))
        if origin is None:
            origin = self._new_origin(url)
        ctx = context.current()
        deadline = ctx.deadline if ctx is not None else None
        return await Call(self.inner, origin, self.settings, request, deadline).send()

    def _new_origin(self, url: httpx.URL) -> Origin:
        origins = self._origins
        if len(origins) >= _MAX_ORIGINS:
            # Calls to ever new hosts (webhooks, user URLs) must not grow this without
            # bound: forget one origin with nothing to remember.
            for key, known in origins.items():
                if known.idle:
                    del origins[key]
                    break
        label = origin_label(url)
        origin = Origin(label, self.settings, self._on_change(label))
        origins[(url.scheme, url.netloc)] = origin
        return origin

    def _on_change(self, label: str) -> Any:
        guard = self.guard
        if guard is None:
            return None  # the breaker logs its transitions itself
        name = self.name

        def changed(old: str | None, new: str, snapshot: dict[str, Any]) -> None:
            guard.telemetry.event(
                "outbound_breaker_state",
                key=f"{name}:{label}",
                transition=True,
                client=name,
                origin=label,
                old=old,
                new=new,
                retry_after=snapshot.get("retry_after"),
                logged=True,
            )

        return changed

    def snapshot(self) -> dict[str, Any]:
        """Each origin's breaker, bulkhead, retry budget and counters, as plain data."""
        return {
            "name": self.name,
            "closed": self.closed,
            "origins": [origin.snapshot() for origin in self._origins.values()],
        }

    async def aclose(self) -> None:
        """Close the inner transport (the client does it on ``aclose``)."""
        self.closed = True
        await self.inner.aclose()
