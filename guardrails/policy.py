"""Per-route policies: the ``Policy`` settings and the ``@policy`` decorator.

Which policy a request gets is decided in :mod:`guardrails.routing`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from typing import Any, Literal, TypeVar

from guardrails.limiter import Priority
from guardrails.limiter_checks import seconds

__all__ = ["POLICY_ATTRIBUTE", "OnUnavailable", "Policy", "policy"]

_T = TypeVar("_T")
POLICY_ATTRIBUTE = "__guardrails_policy__"


class OnUnavailable(str, Enum):
    """What a route answers when the database cannot serve it."""

    STALE = "stale"
    """Serve the last good cached response if one is fresh enough, else 503."""
    REJECT = "reject"
    """Answer 503 with ``Retry-After`` at once."""


PriorityName = Literal["critical", "normal", "low"]


def _optional_seconds(value: float | timedelta | None, name: str) -> float | None:
    return None if value is None else seconds(value, name)


@dataclass(frozen=True, slots=True)
class Policy:
    """How guardrails treats one route (or a family of routes matched by a pattern).

    Attach one with the :func:`policy` decorator on an endpoint, or name it in
    ``Guardrails(policies={"/reports/{path:path}": Policy(...)})``.
    """

    exempt: bool = False
    """Bypass guardrails entirely: health checks, static files, metrics."""
    needs_db: bool = True
    """The route uses the database: it takes a slot and is refused while the DB is down."""
    priority: Priority | PriorityName = Priority.NORMAL
    """Admission lane: ``"critical"``, ``"normal"`` or ``"low"`` (shed first)."""
    max_concurrency: int | None = None
    """Sub-limit for the routes sharing this policy, counted inside the global limit."""
    timeout: float | timedelta | None = None
    """Request deadline in seconds: no waiting or retrying past it."""
    cache_ttl: float | timedelta | None = None
    """Seconds a cached response counts as fresh."""
    stale_ttl: float | timedelta | None = None
    """Seconds a cached response may still be served as a stale fallback."""
    cache_key: Callable[[Any], str | None] | None = field(default=None, compare=False)
    """Cache key for requests carrying Authorization or Cookie (None: do not cache)."""
    on_unavailable: OnUnavailable | Literal["stale", "reject"] = OnUnavailable.STALE
    """Fallback when the database cannot serve: ``"stale"`` or ``"reject"``."""
    writes: bool | None = None
    """Whether the route writes: refused in read-only mode. ``None``: unsafe methods
    (POST, PUT, PATCH, DELETE) write; ``False`` for a POST that only reads (login,
    search, GraphQL queries), which read-only mode then serves."""
    max_body: int | None = 1 << 20
    """Largest request body in bytes, read in full before a slot is taken (bigger: 413).
    ``None`` hands the body to the app unread, for routes that stream uploads."""
    body_timeout: float | timedelta = 10.0
    """Seconds the client has to send the whole body before it gets 408."""
    send_timeout: float | timedelta | None = 5.0
    """Seconds one chunk of the response may wait for the client to read it before the
    response is aborted and its slot goes back; ``None``: wait as long as it takes."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "priority", Priority(self.priority))
        except ValueError:
            raise ValueError(
                f"priority must be one of 'critical', 'normal', 'low', not {self.priority!r}"
            ) from None
        try:
            object.__setattr__(self, "on_unavailable", OnUnavailable(self.on_unavailable))
        except ValueError:
            raise ValueError(
                f"on_unavailable must be 'stale' or 'reject', not {self.on_unavailable!r}"
            ) from None
        for name in ("exempt", "needs_db"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.writes is not None and not isinstance(self.writes, bool):
            raise TypeError(f"writes must be True, False or None (by method), not {self.writes!r}")
        if self.max_concurrency is not None and (
            isinstance(self.max_concurrency, bool)
            or not isinstance(self.max_concurrency, int)
            or self.max_concurrency < 1
        ):
            raise ValueError(
                f"max_concurrency must be a whole number >= 1 or None, not {self.max_concurrency!r}"
            )
        for name in ("timeout", "cache_ttl", "stale_ttl", "send_timeout"):
            object.__setattr__(self, name, _optional_seconds(getattr(self, name), name))
        if self.timeout == 0:
            raise ValueError("timeout must be > 0 seconds, or None for no deadline")
        if self.send_timeout == 0:
            raise ValueError("send_timeout must be > 0 seconds, or None to wait for the client")
        body_timeout = seconds(self.body_timeout, "body_timeout")
        if not body_timeout > 0:
            raise ValueError(f"body_timeout must be > 0 seconds, not {body_timeout!r}")
        object.__setattr__(self, "body_timeout", body_timeout)
        if self.max_body is not None and (
            isinstance(self.max_body, bool)
            or not isinstance(self.max_body, int)
            or self.max_body < 0
        ):
            raise ValueError(
                f"max_body must be a whole number of bytes >= 0, or None to let the app "
                f"stream the body, not {self.max_body!r}"
            )
        if self.cache_key is not None and not callable(self.cache_key):
            raise TypeError(
                f"cache_key must be a callable taking the request, not {self.cache_key!r}"
            )


def policy(_policy: Policy | None = None, /, **fields: Any) -> Callable[[_T], _T]:
    """Attach a :class:`Policy` to an endpoint (function or ``HTTPEndpoint`` class).

    Works in either order with Starlette's ``Route`` and FastAPI's ``@app.get``,
    because it marks the endpoint object itself instead of wrapping it::

        @gr.policy(cache_ttl=30, stale_ttl=600)
        async def dashboard(request): ...

        @app.get("/reports")
        @gr.policy(priority="low", max_concurrency=2)
        async def reports(): ...
    """
    if _policy is not None and fields:
        raise TypeError("pass either a Policy or its fields to @policy, not both")
    chosen = _policy if _policy is not None else Policy(**fields)
    if not isinstance(chosen, Policy):
        raise TypeError(f"@policy takes a guardrails Policy, not {chosen!r}")

    def mark(endpoint: _T) -> _T:
        already = getattr(endpoint, POLICY_ATTRIBUTE, None)
        if isinstance(already, Policy) and already != chosen:
            name = getattr(endpoint, "__qualname__", repr(endpoint))
            raise ValueError(
                f"{name} already has a different @policy; one endpoint has one policy. "
                "To give routes that share a handler different policies, name them in "
                "Guardrails(policies={...}) instead"
            )
        try:
            setattr(endpoint, POLICY_ATTRIBUTE, chosen)
        except (AttributeError, TypeError):
            raise TypeError(
                f"@policy cannot mark {endpoint!r}; put it on the endpoint function or "
                "class itself, or name the route in Guardrails(policies=...)"
            ) from None
        return endpoint

    return mark
