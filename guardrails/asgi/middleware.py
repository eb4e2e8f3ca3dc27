"""``GuardrailsMiddleware``: the pure-ASGI front door that admits, queues or sheds requests.

It resolves each HTTP request's policy, takes a slot from the guard's limiter,
and gives the slot back once the response body is fully sent or the app exits.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardrails import context, fallback
from guardrails.breaker import CLOSED, Trial
from guardrails.errors import ErrorKind, GuardrailsError, Shed, Unavailable, in_chain
from guardrails.fallback import CachedResponse, ResponseStore
from guardrails.guard import ErrorResponseFactory, Guardrails
from guardrails.limiter import ConcurrencyLimiter, Permit, Priority
from guardrails.policy import OnUnavailable, Policy, ResolvedRoute

__all__ = ["GuardrailsMiddleware"]

logger = logging.getLogger("guardrails")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_FINAL_SEND_TYPES = frozenset({"http.response.pathsend", "http.response.zerocopysend"})
_DEFAULT_ENTRY_LIMIT = 1 << 20


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


class _Capture:
    """Copies a cacheable response as it goes out, without delaying or altering it."""

    __slots__ = ("body", "headers", "plan", "size", "status")

    def __init__(self, plan: _CachePlan) -> None:
        self.plan = plan
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0


class _CachePlan:
    """How this request reads and writes the response store (only for caching routes)."""

    __slots__ = ("headers", "limit", "method", "path", "policy", "query", "store", "user_key")

    def __init__(
        self, store: ResponseStore, scope: Scope, policy: Policy, user_key: str | None
    ) -> None:
        self.store = store
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: bytes = scope.get("query_string", b"")
        self.headers: list[tuple[bytes, bytes]] = scope["headers"]
        self.policy = policy
        self.user_key = user_key
        self.limit: int = getattr(store, "max_entry_bytes", _DEFAULT_ENTRY_LIMIT)
        """Largest body copied for storing; a bigger one passes through uncopied."""

    async def lookup(self, max_age: float | None) -> CachedResponse | None:
        """The stored response if it is at most ``max_age`` seconds old."""
        if max_age is None:
            return None
        found = await fallback.lookup(
            self.store, self.method, self.path, self.query, self.headers, self.user_key
        )
        if found is None or time.time() - found.stored_at > max_age:
            return None
        return found

    async def remember(self, capture: _Capture) -> None:
        policy = self.policy
        ttl = max(policy.cache_ttl or 0.0, policy.stale_ttl or 0.0)
        response = CachedResponse.build(capture.status, capture.headers, b"".join(capture.body))
        await fallback.remember(
            self.store,
            self.method,
            self.path,
            self.query,
            self.headers,
            self.user_key,
            response,
            ttl,
        )


class _Responder(context.CallContext):
    """The request's :class:`~guardrails.context.CallContext`, and its wrapped ``send``.

    One object per request for both (the hot path allocates as little as it can): it
    notes when the response starts, releases the slot after the last body chunk, and
    copies a cacheable response for the fallback.
    """

    __slots__ = ("cancel", "capture", "held", "limiter", "permit", "send", "started")

    def __init__(
        self,
        send: Send,
        limiter: ConcurrencyLimiter,
        permit: Permit | None,
        route: str,
        deadline: float | None,
        trial: Any,
        capture: _Capture | None,
    ) -> None:
        self.send = send
        self.limiter = limiter
        self.permit = permit
        self.held = True
        self.started = False
        self.cancel: anyio.CancelScope | None = None
        self.capture = capture
        self.route = route
        self.deadline = deadline
        self.trial = trial
        self.recorded = False
        self.failure = None
        self.pool_timeout = None
        self.touched = False
        self.checkouts = {}

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            if self.cancel is not None:
                # The deadline covers the wait for an answer, not the sending of it.
                self.cancel.deadline = math.inf
        await self.send(message)
        if (kind == "http.response.body" or kind in _FINAL_SEND_TYPES) and not message.get(
            "more_body", False
        ):
            # Sent in full: the slot goes back before a copy is stored (a remote store's
            # write must not hold a database slot).
            self.release()
        if self.capture is not None:
            await self._copy(kind, message)

    async def _copy(self, kind: str, message: Message) -> None:
        capture = self.capture
        assert capture is not None
        if kind == "http.response.start":
            headers = list(message.get("headers", ()))
            if fallback.response_cacheable(message["status"], headers):
                capture.status = message["status"]
                capture.headers = headers
                return
        elif kind == "http.response.body":
            body: bytes = message.get("body", b"")
            capture.size += len(body)
            if capture.size <= capture.plan.limit:
                capture.body.append(body)
                if not message.get("more_body", False):
                    self.capture = None
                    await capture.plan.remember(capture)
                return
        self.capture = None  # not cacheable, too big, or sent as a file: pass it through

    def release(self) -> None:
        """Give the slot back; only the first call does anything."""
        if self.held:
            self.held = False
            if self.permit is None:
                self.limiter.give_back()
            else:
                self.permit.release()


class GuardrailsMiddleware:
    """Pure ASGI middleware applying a :class:`~guardrails.guard.Guardrails` to every request.

    ``app.add_middleware(GuardrailsMiddleware, guard=guard)`` on Starlette or FastAPI.
    For each HTTP request it resolves the route's policy, then:

    - exempt routes and routes that do not need the database pass straight through;
      websocket and lifespan scopes are untouched;
    - a fresh cached response (``cache_ttl``) is served without touching the database;
    - in read-only mode (or while the breaker is open, with ``read_only_on_open``)
      unsafe methods get 503 ``read_only``;
    - while the breaker is open, database routes get 503 ``unavailable`` at once;
    - the rest take a slot, waiting at most ``queue_timeout`` (or their deadline), or
      get 503 ``overloaded``;
    - an outage escaping the app before its response started gets 503 ``unavailable``;
      a request past its policy ``timeout`` before its response started gets 503
      ``timeout``.

    Every 503 carries an integer ``Retry-After``. Routes with ``stale_ttl`` answer it
    with their last good response instead, marked ``X-Guardrails: stale`` with ``Age``.
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
        if not guard._sampling:
            guard._start_sampler()
        limiter = guard.limiter
        breaker = guard.breaker
        plan = None
        if route.caches and guard.cache is not None:
            plan = self._cache_plan(scope, route.policy, guard.cache)
            if plan is not None:
                fresh = await plan.lookup(route.policy.cache_ttl)  # type: ignore[arg-type]
                if fresh is not None:
                    await self._replay(send, fresh, b"hit")
                    return
        if method not in SAFE_METHODS and (
            guard._read_only or (breaker.state != CLOSED and guard.read_only_on_open)
        ):
            retry_after = max(limiter.retry_after, breaker.retry_after)
            await self._refuse(scope, send, route, "read_only", "read_only", retry_after, None)
            return
        trial = None
        if breaker.state != CLOSED:
            # Open: refuse without touching the pool. Half-open: this request may be
            # the one trial; low-priority work never is.
            try:
                if route.priority is Priority.LOW:
                    raise breaker.unavailable()
                trial = breaker.admit()
            except Unavailable as exc:
                await self._refuse(
                    scope, send, route, "unavailable", "breaker_open", exc.retry_after, plan
                )
                return
        deadline = None if route.timeout is None else anyio.current_time() + route.timeout
        # A free slot is taken synchronously: no coroutine, no clock read, no allocation.
        permit = None
        if route.bulkhead is None:
            admitted = limiter.try_take(route.priority)
        else:
            permit = limiter.try_acquire(route.priority, bulkhead=route.bulkhead)
            admitted = permit is not None
        if not admitted:
            waited_from = anyio.current_time()
            try:
                permit = await limiter.acquire(
                    route.priority, deadline=deadline, bulkhead=route.bulkhead
                )
            except Shed as exc:
                breaker.release(trial)
                await self._refuse(
                    scope, send, route, "overloaded", exc.reason, exc.retry_after, plan
                )
                return
            except BaseException:
                breaker.release(trial)
                raise
            guard.telemetry.observe_queue_wait(anyio.current_time() - waited_from)
            if breaker.state != CLOSED and (trial is None or trial.done):
                # The breaker opened (or moved on without this request's trial) while it
                # waited: it must not reach the pool.
                permit.release()
                await self._refuse(
                    scope, send, route, "unavailable", "breaker_open", breaker.retry_after, plan
                )
                return
        capture = None if plan is None or (method != "GET" and method != "HEAD") else _Capture(plan)
        ctx = responder = _Responder(
            send, limiter, permit, route.template, deadline, trial, capture
        )
        token = context.var.set(ctx)
        try:
            if deadline is None:
                await self.app(scope, receive, responder)
            else:
                with anyio.CancelScope(deadline=deadline) as responder.cancel:
                    await self.app(scope, receive, responder)
                if responder.cancel.cancelled_caught and not responder.started:
                    # Past its deadline before it had an answer: the client gets a 503
                    # now instead of waiting on; the slot goes back below.
                    breaker.release(trial)
                    ctx.recorded = True
                    responder.release()
                    retry_after = limiter.retry_after
                    await self._refuse(scope, send, route, "timeout", "timeout", retry_after, plan)
        except Exception as exc:
            kind = self._settle(ctx, trial, exc)
            if responder.started or kind is not ErrorKind.OUTAGE:
                raise
            # The database failed before the response started: a 503 the client can act
            # on, never the driver's text. The server log keeps the exception.
            guard.telemetry.event(
                "outage_answered",
                key=route.template,
                route=route.template,
                level=logging.WARNING,
                message=f"{method} {route.template}: database unavailable "
                f"({type(exc).__name__}), answered 503",
                exc_info=exc,
            )
            responder.release()
            retry_after = exc.retry_after if isinstance(exc, Unavailable) else 0
            retry_after = max(1, retry_after, breaker.retry_after)
            await self._refuse(scope, send, route, "unavailable", "outage", retry_after, plan)
        except BaseException:
            breaker.release(trial)
            if ctx.pool_timeout is not None:  # cancelled, but the pool had timed out
                breaker.record_outage(ctx.pool_timeout)
            raise
        else:
            if ctx.pool_timeout is not None or (
                not ctx.recorded and (trial is not None or breaker.counting)
            ):
                self._settle(ctx, trial, None)
        finally:
            responder.release()
            if trial is not None:
                breaker.release(trial)  # never left held, whatever happened above
            context.var.reset(token)
            if ctx.checkouts:
                guard._request_finished(ctx)

    def _settle(
        self, ctx: context.CallContext, trial: Trial | None, exc: Exception | None
    ) -> ErrorKind | None:
        """Tell the breaker what this request proved about the database, each failure once.

        Returns the kind of ``exc``. A failure a guarded call already recorded is not
        counted again; a pool timeout the app caught and answered itself still counts.
        With a watched pool, a request that never got a connection (a 404, a handler
        that failed before its query) proves nothing: it neither closes a half-open
        breaker nor resets the failure count, and its trial goes back undecided (the
        third such success in a row does count, see ``Breaker.trust_unproven``).
        """
        guard = self.guard
        breaker = guard.breaker
        live = trial if trial is not None and not trial.done else None
        pending, ctx.pool_timeout = ctx.pool_timeout, None
        proves = ctx.touched or not guard._watchers
        kind = None
        if exc is not None:
            kind = guard._classify(exc)
            failure = ctx.failure
            counted = (failure is not None and in_chain(exc, failure)) or (
                ctx.recorded and isinstance(exc, GuardrailsError)
            )
            if not counted:
                if pending is not None and in_chain(exc, pending):
                    pending = None
                # The app's own error proves the database answered only when nothing
                # else said otherwise in this request.
                if kind is ErrorKind.OUTAGE or (proves and not ctx.recorded and pending is None):
                    breaker.record(live, exc)
                    live = None
                guard._note_failure(exc)
                ctx.failure = exc
        if pending is not None:
            if live is not None:
                breaker.record(live, pending)
                live = None
            else:
                breaker.record_outage(pending)
        elif (
            exc is None
            and not ctx.recorded
            and (proves or (live is not None and breaker.trust_unproven()))
        ):
            breaker.record(live)
            live = None
        breaker.release(live)
        ctx.recorded = True
        return kind

    def _cache_plan(self, scope: Scope, policy: Policy, store: ResponseStore) -> _CachePlan | None:
        user_key = None
        if policy.cache_key is not None:
            try:
                user_key = policy.cache_key(Request(scope))
            except Exception:
                logger.exception("cache_key of %s failed; the request is not cached", policy)
                return None
        if not fallback.request_cacheable(scope["method"], scope["headers"], user_key is not None):
            return None
        return _CachePlan(store, scope, policy, user_key)

    async def _refuse(
        self,
        scope: Scope,
        send: Send,
        route: ResolvedRoute,
        error: str,
        reason: str,
        retry_after: int,
        plan: _CachePlan | None,
    ) -> None:
        """Answer a request guardrails will not run: a stale replay if allowed, else 503."""
        telemetry = self.guard.telemetry
        telemetry.count_shed(reason, route.template)
        policy = route.policy
        if plan is not None and policy.on_unavailable is OnUnavailable.STALE:
            stale = await plan.lookup(policy.stale_ttl)  # type: ignore[arg-type]
            if stale is not None:
                telemetry.count_fallback("stale", route.template)
                await self._replay(send, stale, b"stale")
                return
        if policy.stale_ttl is not None:
            telemetry.count_fallback("rejected", route.template)
        await self._reject(scope, send, error, retry_after)

    async def _replay(self, send: Send, response: CachedResponse, marker: bytes) -> None:
        headers = fallback.stale_headers(response, time.time())
        if marker != b"stale":
            headers[-1] = (b"x-guardrails", marker)
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _reject(self, scope: Scope, send: Send, error: str, retry_after: int) -> None:
        factory = self.guard.error_response
        if factory is not None:
            custom = self._custom(factory, scope, error, retry_after)
            if custom is not None:
                await custom(scope, _no_body, send)
                return
        if _prefers_html(scope):
            headers, body = html_error_response(error, retry_after)
        else:
            key = (error, retry_after)
            response = self._responses.get(key)
            if response is None:
                response = self._responses[key] = error_response(error, retry_after)
            headers, body = response
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _custom(
        self, factory: ErrorResponseFactory, scope: Scope, error: str, retry_after: int
    ) -> Response | None:
        try:
            response = factory(Request(scope), error, retry_after)
        except Exception:
            logger.exception("error_response factory failed; sending the default 503")
            return None
        if response is None:
            return None
        # Whatever the factory built, the client always gets an integer Retry-After.
        response.headers["retry-after"] = str(retry_after)
        return response


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _prefers_html(scope: Scope) -> bool:
    """Whether the client's Accept ranks text/html above application/json."""
    accept = b""
    for name, value in scope["headers"]:
        if name == b"accept":
            accept = value
            break
    if b"text/html" not in accept:
        return False
    html = json_q = 0.0
    for item in accept.decode("latin-1").split(","):
        media, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media == "text/html":
            html = max(html, q)
        elif media == "application/json":
            json_q = max(json_q, q)
    return html > json_q


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 32em; margin: 4em auto">
<h1>{title}</h1><p>{text} Please try again in {retry_after} {unit}.</p></body></html>
"""
_HTML_TEXT = {
    "read_only": ("Read-only for a moment", "Changes cannot be saved right now."),
    "unavailable": ("Temporarily unavailable", "We cannot reach our database right now."),
    "timeout": ("Taking too long", "This page took too long to prepare."),
}


def html_error_response(error: str, retry_after: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A small friendly HTML page for browsers: busy, try again in N seconds."""
    title, text = _HTML_TEXT.get(error, ("Temporarily busy", "We are busy right now."))
    unit = "second" if retry_after == 1 else "seconds"
    body = _HTML.format(title=title, text=text, retry_after=retry_after, unit=unit).encode()
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
        (b"cache-control", b"no-store"),
    ]
    return headers, body


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
