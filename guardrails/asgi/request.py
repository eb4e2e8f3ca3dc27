"""One guarded request's life, top to bottom: :class:`GuardedRequest`.

The middleware builds one per HTTP request that needs the database and calls
:meth:`GuardedRequest.handle`. Each step either answers the request (a fresh copy, a
refusal) or lets it go on, in the order of the design: fresh copy, read-only mode,
breaker, slot, the app, the outcome, the fallback. The object is also the request's
:class:`~guardrails.context.CallContext`, and its :meth:`~GuardedRequest.forward` is the
app's ``send``, so the hot path allocates little besides the
:class:`~guardrails.outcome.Outcome` (made only when needed).
"""

from __future__ import annotations

import asyncio
import math
from time import monotonic as _monotonic
from typing import TYPE_CHECKING

import anyio
from starlette.types import Message, Receive, Scope, Send

from guardrails import context
from guardrails.asgi.answers import answer_outage, refuse, serve_fresh
from guardrails.asgi.body import GONE, read_up_front
from guardrails.asgi.clients import uncancel
from guardrails.asgi.refusal import Refusal, refusal_for, shed_behind
from guardrails.asgi.stored import CachePlan, Capture
from guardrails.breaker import CLOSED
from guardrails.errors import ErrorKind, Shed, Unavailable, in_chain
from guardrails.limiter import Permit, Priority
from guardrails.pools import request_finished
from guardrails.routing import ResolvedRoute

if TYPE_CHECKING:
    from guardrails.asgi.middleware import GuardrailsMiddleware
    from guardrails.guard import Guardrails

__all__ = ["GuardedRequest"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_FINAL_SEND_TYPES = frozenset({"http.response.pathsend", "http.response.zerocopysend"})


class GuardedRequest(context.CallContext):
    """One request through guardrails: admission, the app call, and what it proved."""

    __slots__ = (
        "aborted",
        "cancel",
        "capture",
        "client_deadline",
        "client_error",
        "held",
        "middleware",
        "plan",
        "receive",
        "resolved",
        "scope",
        "send",
        "started",
        "taken",
        "task",
    )

    cancel: anyio.CancelScope
    client_deadline: float

    def __init__(
        self,
        middleware: GuardrailsMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        resolved: ResolvedRoute,
    ) -> None:
        # The CallContext's fields, set here without a call (the hot path).
        self.route = resolved.template
        self.guard: Guardrails = middleware.guard
        self._outcome = None
        self.deadline: float | None = None
        self.checkouts = {}
        self.middleware = middleware
        self.scope = scope
        self.receive: Receive = receive
        """What the app gets as ``receive``: the server's, or the body read up front."""
        self.send = send
        self.resolved = resolved
        self.plan: CachePlan | None = None
        self.capture: Capture | None = None
        self.held: Permit | bool = False
        """The slot: a :class:`Permit`, True for one taken with ``try_take``, or False."""
        self.taken = 0.0
        """When the slot was taken, on the adaptive limit's clock (0: not timed)."""
        self.started = False
        self.task: asyncio.Task[object] | None = None
        """The request's task while the watchdog looks after it (see :meth:`_watch`)."""
        self.client_error: BaseException | None = None
        self.aborted = False
        # Set only on the paths that use them: ``cancel`` with a deadline,
        # ``client_deadline`` before the watchdog first sees the request.

    async def handle(self) -> None:
        """Run the request's whole life; see the module docstring for the order."""
        resolved = self.resolved
        guard = self.guard
        limiter = guard.limiter
        # The common case (a read, the breaker closed, a free slot) is decided inline: no
        # coroutine, no clock read (unless an adaptive limit times how long slots are
        # held). Everything else takes the steps of :meth:`_admit`.
        if (
            resolved.inline
            and self.scope["method"] in SAFE_METHODS
            and guard.breaker.state is CLOSED
            and limiter.try_take(resolved.priority)
        ):
            self.held = True
            if limiter.adaptive is not None:
                self.taken = limiter.adaptive.clock()
        elif not await self._admit():
            return
        token = context.enter(self)
        try:
            deadline = self.deadline
            if deadline is None:
                await self.middleware.app(self.scope, self.receive, self.forward)
            else:
                await self._run_until(deadline)
        except Exception as exc:
            if self.started or self._from_client(exc):
                # What fails once the answer is on its way, or in talking to the client,
                # says nothing about the database.
                self._abandon()
                raise
            shed = shed_behind(exc)
            if shed is not None:
                # Refused for load, or another service is down: not the database. Its
                # retry_after, the route's fallback, and the database's breaker left alone.
                self._abandon()
                self.release()
                await refuse(self, refusal_for(shed))
                return
            if self.outcome.fail(exc) is not ErrorKind.OUTAGE:
                raise
            await answer_outage(self, exc)
        except asyncio.CancelledError:
            self._abandon()
            if not self.aborted:
                raise
            # The watchdog let go of a client too slow to read: the response stays cut
            # short, the slot is back already, and the server closes the connection.
            uncancel(self.task)
        except BaseException:
            self._abandon()
            raise
        finally:
            if self.held:
                self.release()
            # Tell the breaker what the request proved: safe after any of the above,
            # never leaves a trial held. A success after outages resets the count.
            outcome = self._outcome
            if outcome is not None:
                outcome.finish()
            elif guard.breaker.counting:
                self.outcome.finish()
            context.leave(token)
            if self.checkouts:
                request_finished(self)
            if self.task is not None:
                self.middleware.clients.forget(self)

    async def _run_until(self, deadline: float) -> None:
        with anyio.CancelScope(deadline=deadline) as self.cancel:
            await self.middleware.app(self.scope, self.receive, self.forward)
        if self.cancel.cancelled_caught and not self.started:
            # Past its deadline before it had an answer: the client gets a 503 now
            # instead of waiting on.
            self._abandon()
            self.release()
            await refuse(self, Refusal("timeout", "timeout", self.guard.limiter.retry_after))

    def _abandon(self) -> None:
        if self._outcome is not None:
            self._outcome.abandon()

    # -- before the app -----------------------------------------------------------------

    async def _admit(self) -> bool:
        """Each step answers the request or lets it go on; whether it goes on to the app."""
        resolved = self.resolved
        guard = self.guard
        if resolved.caches and guard.cache is not None:
            self.plan = CachePlan.make(
                self.scope,
                self.route,
                resolved.policy,
                guard.cache,
                guard.credential_headers,
                self.middleware.warned,
            )
            if self.plan is not None and await serve_fresh(self):
                return False
        refusal = None
        if resolved.writes or self.scope["method"] not in SAFE_METHODS:
            refusal = await self._check_write()
        if refusal is None and guard.breaker.state is not CLOSED:
            refusal = self._pass_breaker()
        if refusal is None:
            if resolved.timeout is not None:
                self.deadline = anyio.current_time() + resolved.timeout
            limiter = guard.limiter
            if resolved.bulkhead is None and limiter.try_take(resolved.priority):
                self.held = True
                if limiter.adaptive is not None:
                    self.taken = limiter.adaptive.clock()
            else:
                refusal = await self._take_slot()
        if refusal is not None:
            self._abandon()
            if refusal is not GONE:  # else the client went away sending its body
                await refuse(self, refusal)
            return False
        if self.plan is not None:
            self.capture = self.plan.capture()
        return True

    async def _check_write(self) -> Refusal | None:
        """Read-only mode refuses writes; an unsafe method's body is read before a slot."""
        resolved = self.resolved
        guard = self.guard
        method = self.scope["method"]
        writes = resolved.writes
        if (writes or (writes is None and method not in SAFE_METHODS)) and guard.read_only:
            retry_after = max(guard.limiter.retry_after, guard.breaker.retry_after)
            return Refusal("read_only", "read_only", retry_after)
        if resolved.max_body is not None and method not in SAFE_METHODS:
            # Before the breaker: a client sending its body slowly must not sit on the
            # half-open trial (nor, below, on a slot).
            return await read_up_front(self)
        return None

    def _pass_breaker(self) -> Refusal | None:
        breaker = self.guard.breaker
        # Open: refuse without touching the pool. Half-open: this request may be the
        # one trial; low-priority work never is.
        try:
            if self.resolved.priority is Priority.LOW:
                raise breaker.unavailable()
            self.outcome.trial = breaker.admit()
        except Unavailable as exc:
            return Refusal("unavailable", "breaker_open", exc.retry_after)
        return None

    # -- waiting on the client ----------------------------------------------------------

    def wait_on_client(self, timeout: float) -> None:
        """Wait on the client for at most ``timeout`` seconds from now; reset
        ``client_deadline`` to 0 once it answered."""
        self.client_deadline = _monotonic() + timeout
        if self.task is None:
            self._watch()

    def _watch(self) -> None:
        """Let the watchdog look after this request; its client deadline is set."""
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return  # not asyncio: nothing the watchdog could cancel
        if task is not None:
            self.task = task
            self.middleware.clients.watch(self)

    def stalled(self) -> None:
        """The client stopped reading: with watched pools, a request that holds no
        connection gives its slot back now instead of after ``send_timeout``."""
        if self.started and not self.checkouts and self.guard.watching:
            self.release()

    def abort(self) -> None:
        """The client is too slow: give the slot back now and stop the request."""
        self.aborted = True
        self.release()
        if self.task is not None:
            self.task.cancel()

    # -- a slot after waiting --------------------------------------------------------

    async def _take_slot(self) -> Refusal | None:
        guard = self.guard
        limiter = guard.limiter
        resolved = self.resolved
        if resolved.bulkhead is not None:
            permit = limiter.try_acquire(resolved.priority, bulkhead=resolved.bulkhead)
            if permit is not None:
                self.held = permit
                return None
        waited_from = anyio.current_time()
        try:
            self.held = await limiter.acquire(
                resolved.priority, deadline=self.deadline, bulkhead=resolved.bulkhead
            )
        except Shed as exc:
            return Refusal("overloaded", exc.reason, exc.retry_after)
        except BaseException:
            self._abandon()
            raise
        if limiter.adaptive is not None:
            self.taken = limiter.adaptive.clock()
        guard.telemetry.observe_queue_wait(anyio.current_time() - waited_from)
        breaker = guard.breaker
        trial = self._outcome.trial if self._outcome is not None else None
        if breaker.state is not CLOSED and (trial is None or trial.done):
            # The breaker opened (or moved on without this request's trial) while it
            # waited: it must not reach the pool.
            self.release()
            return Refusal("unavailable", "breaker_open", breaker.retry_after)
        return None

    # -- while the app runs ---------------------------------------------------------------

    def _from_client(self, exc: BaseException) -> bool:
        client = self.client_error
        return client is not None and in_chain(exc, client)

    async def forward(self, message: Message) -> None:
        """The app's ``send``: notes the start, frees the slot before the last chunk."""
        kind = message["type"]
        final = False
        if kind == "http.response.start":
            self.started = True
            if self.deadline is not None:
                # The deadline covers the wait for an answer, not the sending of it.
                self.cancel.deadline = math.inf
        elif (kind == "http.response.body" or kind in _FINAL_SEND_TYPES) and not message.get(
            "more_body", False
        ):
            final = True
            if self.held and not self.checkouts:
                # The app has produced all of it and holds no connection: the slot goes
                # back before the client reads it (a slow reader holds nothing), and
                # before a copy is stored (a remote store's write must not hold a slot).
                self.release(completed=True)
        elif kind == "http.response.body":
            # A chunk before the last waits on the client while the slot is held: this
            # hold says how fast the client reads, not the database. No sample, or a
            # slow reader could talk the adaptive limit down for everyone.
            self.taken = 0.0
        timeout = self.resolved.send_timeout
        if timeout is not None:  # wait_on_client(timeout), inline: twice per request
            self.client_deadline = _monotonic() + timeout
            if self.task is None:
                self._watch()
        try:
            await self.send(message)
        except BaseException as exc:
            self.client_error = exc  # a hang-up is the client's, never the database's
            raise
        finally:
            self.client_deadline = 0.0
        if final:
            if self.held:
                self.release()  # held while the client read: not a sample either
            if self.task is not None:
                # Nothing more to wait on the client for: background tasks that run
                # after the response must not keep the watchdog awake.
                self.middleware.clients.forget(self)
                self.task = None
        capture = self.capture
        if capture is not None and not await capture.copy(kind, message):
            self.capture = None

    def release(self, completed: bool = False) -> None:
        """Give the slot back; only the first call does anything.

        ``completed``: the app produced its whole answer without waiting on its client,
        so the hold is a sample for an adaptive limit, unless the request failed or a
        pool timed out on it.
        """
        held = self.held
        if held:
            self.held = False
            limiter = self.guard.limiter
            if held is True:
                limiter.give_back()
            elif isinstance(held, Permit):
                held.release()
            if completed and self.taken:
                outcome = self._outcome
                if outcome is None or outcome.healthy:
                    limiter.completed(self.taken)
