"""What a guarded request gets instead of the app: a stored copy, fresh or stale, or a
refusal the client can act on (also when the database fails before the answer starts).

Both go out through the app's CORS middleware, when it has one, so a browser can read
them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from guardrails.asgi.cors import through_cors
from guardrails.asgi.refusal import Refusal
from guardrails.asgi.stored import replay
from guardrails.errors import Unavailable
from guardrails.policy import OnUnavailable

if TYPE_CHECKING:
    from guardrails.asgi.request import GuardedRequest

__all__ = ["answer_outage", "refuse", "serve_fresh"]


async def serve_fresh(request: GuardedRequest) -> bool:
    """Answer ``request`` with a fresh stored copy if there is one; whether it did."""
    plan = request.plan
    assert plan is not None
    fresh = await plan.lookup(request.resolved.policy.cache_ttl)  # type: ignore[arg-type]
    if fresh is None:
        return False
    send = through_cors(request.middleware.cors, request.scope, request.send)
    await replay(send, fresh, b"hit")
    return True


async def refuse(request: GuardedRequest, refusal: Refusal) -> None:
    """Answer a request guardrails will not run: a stale copy if allowed, else 503."""
    telemetry = request.guard.telemetry
    template = request.route
    telemetry.count_shed(refusal.reason, template)
    policy = request.resolved.policy
    plan = request.plan
    middleware = request.middleware
    send = through_cors(middleware.cors, request.scope, request.send)
    if refusal.status == 503 and plan is not None and policy.on_unavailable is OnUnavailable.STALE:
        stale = await plan.lookup(policy.stale_ttl)  # type: ignore[arg-type]
        if stale is not None:
            telemetry.count_fallback("stale", template)
            await replay(send, stale, b"stale")
            return
    if refusal.status == 503 and policy.stale_ttl is not None:
        telemetry.count_fallback("rejected", template)
    await middleware.refusals.send(request.scope, send, refusal)


async def answer_outage(request: GuardedRequest, exc: Exception) -> None:
    """The database failed before the response started: a 503 the client can act on,
    never the driver's text. The server log keeps the exception."""
    guard = request.guard
    template = request.route
    pool = request.outcome.pool
    guard.telemetry.event(
        "outage_answered",
        key=template,
        route=template,
        pool=pool,
        error=type(exc).__name__,
        level=logging.WARNING,
        message=f"{request.scope['method']} {template}: database unavailable "
        f"({type(exc).__name__}{f' from pool {pool}' if pool else ''}), answered 503",
        exc_info=exc,
    )
    request.release()
    retry_after = exc.retry_after if isinstance(exc, Unavailable) else 0
    retry_after = max(1, retry_after, guard.breaker.retry_after)
    await refuse(request, Refusal("unavailable", "outage", retry_after))
