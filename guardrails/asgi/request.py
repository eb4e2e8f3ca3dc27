"""One guarded request's life, top to bottom: :class:`GuardedRequest`.

The middleware builds one per HTTP request that needs the database and calls
:meth:`GuardedRequest.handle`. Each step either answers the request (a fresh copy, a
refusal) or lets it go on, in the order of the design: fresh copy, read-only mode,
breaker, slot, the app, the outcome, the fallback. The object is also the request's
:class:`~guardrails.context.CallContext` and its wrapped ``send``, so the hot path
allocates one object besides the :class:`~guardrails.outcome.Outcome`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardrails import context
from guardrails.asgi.refusal import Refusal
from guardrails.asgi.stored import CachePlan, Capture, replay
from guardrails.breaker import CLOSED
from guardrails.errors import ErrorKind, Shed, Unavailable
from guardrails.limiter import Permit, Priority
from guardrails.outcome import Outcome
from guardrails.policy import OnUnavailable
from guardrails.pools import request_finished
from guardrails.routing import ResolvedRoute

if TYPE_CHECKING:
    from guardrails.asgi.middleware import GuardrailsMiddleware

__all__ = ["GuardedRequest"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_FINAL_SEND_TYPES = frozenset({"http.response.pathsend", "http.response.zerocopysend"})


class GuardedRequest(context.CallContext):
    """One request through guardrails: admission, the app call, and what it proved."""

    __slots__ = (
        "app",
        "cancel",
        "capture",
        "held",
        "middleware",
        "permit",
        "plan",
        "resolved",
        "scope",
        "send",
        "started",
    )

    def __init__(
        self,
        middleware: GuardrailsMiddleware,
        scope: Scope,
        send: Send,
        resolved: ResolvedRoute,
    ) -> None:
        super().__init__(resolved.template, Outcome(middleware.guard))
        self.middleware = middleware
        self.app: ASGIApp = middleware.app
        self.scope = scope
        self.send = send
        self.resolved = resolved
        self.plan: CachePlan | None = None
        self.capture: Capture | None = None
        self.permit: Permit | None = None
        self.held = False
        self.started = False
        self.cancel: anyio.CancelScope | None = None

    async def handle(self, receive: Receive) -> None:
        """Run the request's whole life; see the module docstring for the order."""
        resolved = self.resolved
        store = self.middleware.guard.cache
        if resolved.caches and store is not None:
            self.plan = CachePlan.make(self.scope, resolved.policy, store)
            if self.plan is not None and await self._serve_fresh():
                return
        refusal = self._refuse_write() or self._pass_breaker()
        if refusal is None:
            refusal = await self._take_slot()
        if refusal is not None:
            self.outcome.abandon()
            await self._refuse(refusal)
            return
        await self._run_app(receive)

    # -- before the app -----------------------------------------------------------------

    async def _serve_fresh(self) -> bool:
        assert self.plan is not None
        fresh = await self.plan.lookup(self.resolved.policy.cache_ttl)  # type: ignore[arg-type]
        if fresh is None:
            return False
        await replay(self.send, fresh, b"hit")
        return True

    def _refuse_write(self) -> Refusal | None:
        guard = self.middleware.guard
        if self.scope["method"] in SAFE_METHODS or not guard.read_only:
            return None
        retry_after = max(guard.limiter.retry_after, guard.breaker.retry_after)
        return Refusal("read_only", "read_only", retry_after)

    def _pass_breaker(self) -> Refusal | None:
        breaker = self.middleware.guard.breaker
        if breaker.state is CLOSED:
            return None
        # Open: refuse without touching the pool. Half-open: this request may be the
        # one trial; low-priority work never is.
        try:
            if self.resolved.priority is Priority.LOW:
                raise breaker.unavailable()
            self.outcome.trial = breaker.admit()
        except Unavailable as exc:
            return Refusal("unavailable", "breaker_open", exc.retry_after)
        return None

    async def _take_slot(self) -> Refusal | None:
        guard = self.middleware.guard
        limiter = guard.limiter
        resolved = self.resolved
        if resolved.timeout is not None:
            self.deadline = anyio.current_time() + resolved.timeout
        # A free slot is taken synchronously: no coroutine, no clock read, no allocation.
        if resolved.bulkhead is None:
            self.held = limiter.try_take(resolved.priority)
        else:
            self.permit = limiter.try_acquire(resolved.priority, bulkhead=resolved.bulkhead)
            self.held = self.permit is not None
        if self.held:
            return None
        waited_from = anyio.current_time()
        try:
            self.permit = await limiter.acquire(
                resolved.priority, deadline=self.deadline, bulkhead=resolved.bulkhead
            )
        except Shed as exc:
            return Refusal("overloaded", exc.reason, exc.retry_after)
        except BaseException:
            self.outcome.abandon()
            raise
        self.held = True
        guard.telemetry.observe_queue_wait(anyio.current_time() - waited_from)
        breaker = guard.breaker
        trial = self.outcome.trial
        if breaker.state is not CLOSED and (trial is None or trial.done):
            # The breaker opened (or moved on without this request's trial) while it
            # waited: it must not reach the pool.
            self.release()
            return Refusal("unavailable", "breaker_open", breaker.retry_after)
        return None

    # -- the app ------------------------------------------------------------------------

    async def _run_app(self, receive: Receive) -> None:
        if self.plan is not None:
            self.capture = self.plan.capture()
        outcome = self.outcome
        token = context.enter(self)
        try:
            if self.deadline is None:
                await self.app(self.scope, receive, self)
            else:
                with anyio.CancelScope(deadline=self.deadline) as self.cancel:
                    await self.app(self.scope, receive, self)
                if self.cancel.cancelled_caught and not self.started:
                    # Past its deadline before it had an answer: the client gets a 503
                    # now instead of waiting on.
                    outcome.abandon()
                    self.release()
                    retry_after = self.middleware.guard.limiter.retry_after
                    await self._refuse(Refusal("timeout", "timeout", retry_after))
        except Exception as exc:
            if outcome.fail(exc) is not ErrorKind.OUTAGE or self.started:
                raise
            await self._answer_outage(exc)
        except BaseException:
            outcome.abandon()
            raise
        else:
            outcome.finish()
        finally:
            self.release()
            outcome.finish()  # never leaves a trial held, whatever happened above
            context.leave(token)
            if self.checkouts:
                request_finished(self)

    async def _answer_outage(self, exc: Exception) -> None:
        # The database failed before the response started: a 503 the client can act
        # on, never the driver's text. The server log keeps the exception.
        guard = self.middleware.guard
        template = self.route
        guard.telemetry.event(
            "outage_answered",
            key=template,
            route=template,
            level=logging.WARNING,
            message=f"{self.scope['method']} {template}: database unavailable "
            f"({type(exc).__name__}), answered 503",
            exc_info=exc,
        )
        self.release()
        retry_after = exc.retry_after if isinstance(exc, Unavailable) else 0
        retry_after = max(1, retry_after, guard.breaker.retry_after)
        await self._refuse(Refusal("unavailable", "outage", retry_after))

    async def __call__(self, message: Message) -> None:
        """The app's ``send``: notes the start, frees the slot after the last chunk."""
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
        capture = self.capture
        if capture is not None and not await capture.copy(kind, message):
            self.capture = None

    def release(self) -> None:
        """Give the slot back; only the first call does anything."""
        if self.held:
            self.held = False
            if self.permit is None:
                self.middleware.guard.limiter.give_back()
            else:
                self.permit.release()

    # -- answers instead of the app -----------------------------------------------------

    async def _refuse(self, refusal: Refusal) -> None:
        """Answer a request guardrails will not run: a stale copy if allowed, else 503."""
        guard = self.middleware.guard
        telemetry = guard.telemetry
        template = self.route
        telemetry.count_shed(refusal.reason, template)
        policy = self.resolved.policy
        plan = self.plan
        if plan is not None and policy.on_unavailable is OnUnavailable.STALE:
            stale = await plan.lookup(policy.stale_ttl)  # type: ignore[arg-type]
            if stale is not None:
                telemetry.count_fallback("stale", template)
                await replay(self.send, stale, b"stale")
                return
        if policy.stale_ttl is not None:
            telemetry.count_fallback("rejected", template)
        await self.middleware.refusals.send(
            self.scope, self.send, refusal.error, refusal.retry_after
        )
