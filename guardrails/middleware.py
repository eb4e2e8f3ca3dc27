"""``GuardrailsMiddleware``: the pure-ASGI front door that admits, queues or sheds requests.

It resolves each HTTP request's policy, takes a slot from the guard's limiter,
and gives the slot back once the response body is fully sent or the app exits.
"""

from __future__ import annotations

import json

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardrails.errors import Shed
from guardrails.guard import Guardrails
from guardrails.limiter import Permit

__all__ = ["GuardrailsMiddleware"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_FINAL_SEND_TYPES = frozenset({"http.response.pathsend", "http.response.zerocopysend"})


def error_response(error: str, retry_after: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a 503 that tells the client what happened and when to retry.

    Deliberately tiny and fixed: no exception text, driver message or DSN can get in.
    """
    body = json.dumps({"error": error, "retry_after": retry_after}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
        (b"cache-control", b"no-store"),
    ]
    return headers, body


class _Responder:
    """Per-request wrapper of ``send`` that releases the slot after the last body chunk."""

    __slots__ = ("permit", "send")

    def __init__(self, send: Send, permit: Permit) -> None:
        self.send = send
        self.permit = permit

    async def __call__(self, message: Message) -> None:
        await self.send(message)
        kind = message["type"]
        if (kind == "http.response.body" and not message.get("more_body", False)) or (
            kind in _FINAL_SEND_TYPES and not message.get("more_body", False)
        ):
            self.permit.release()


class GuardrailsMiddleware:
    """Pure ASGI middleware applying a :class:`~guardrails.guard.Guardrails` to every request.

    ``app.add_middleware(GuardrailsMiddleware, guard=guard)`` on Starlette or FastAPI.
    Exempt routes and routes that do not need the database pass straight through;
    websocket and lifespan scopes are untouched. A request that cannot be admitted
    within ``queue_timeout`` (or its deadline) gets 503 with an integer
    ``Retry-After`` and ``{"error": "overloaded", "retry_after": N}``.
    """

    def __init__(self, app: ASGIApp, *, guard: Guardrails) -> None:
        if not isinstance(guard, Guardrails):
            raise TypeError(
                f"guard must be a guardrails.Guardrails, not {guard!r}: "
                "app.add_middleware(GuardrailsMiddleware, guard=Guardrails(...))"
            )
        self.app = app
        self.guard = guard
        self._resolver = guard.route_resolver()
        self._responses: dict[tuple[str, int], tuple[list[tuple[bytes, bytes]], bytes]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        route = self._resolver.resolve(
            scope.get("app"),
            method,
            _route_path(scope) if scope.get("root_path") else scope["path"],
        )
        if route.bypass:
            await self.app(scope, receive, send)
            return
        guard = self.guard
        limiter = guard.limiter
        if guard.read_only and method not in SAFE_METHODS:
            await self._reject(send, "read_only", limiter.retry_after)
            return
        # A free slot is taken synchronously: no coroutine, no clock read.
        permit = limiter.try_acquire(route.priority, bulkhead=route.bulkhead)
        if permit is None:
            deadline = None if route.timeout is None else anyio.current_time() + route.timeout
            try:
                permit = await limiter.acquire(
                    route.priority, deadline=deadline, bulkhead=route.bulkhead
                )
            except Shed as exc:
                await self._reject(send, "overloaded", exc.retry_after)
                return
        try:
            await self.app(scope, receive, _Responder(send, permit))
        finally:
            permit.release()

    async def _reject(self, send: Send, error: str, retry_after: int) -> None:
        key = (error, retry_after)
        response = self._responses.get(key)
        if response is None:
            response = self._responses[key] = error_response(error, retry_after)
        headers, body = response
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _route_path(scope: Scope) -> str:
    # The path the app's router matches: without the root_path a server or Mount added
    # (the same rule as Starlette's router).
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    if path[len(root_path)] == "/":
        return path[len(root_path) :]
    return path
