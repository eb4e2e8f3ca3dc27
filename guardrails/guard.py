"""The ``Guardrails`` object: the one place where limiter, policies and modes are put together.

Build one per process, hand it to :class:`~guardrails.asgi.middleware.GuardrailsMiddleware`,
and ask it for :meth:`Guardrails.snapshot` to see what it is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, ParamSpec, Protocol, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response

from guardrails import context
from guardrails.asgi.health import FAIL_CONDITIONS, HealthEndpoint
from guardrails.breaker import Breaker, BreakerSettings, Trial
from guardrails.budget import ConnectionBudget
from guardrails.errors import (
    ErrorKind,
    GuardrailsError,
    ReadOnly,
    Unavailable,
    classify,
    in_chain,
)
from guardrails.fallback.cache import ResponseStore
from guardrails.limiter import ConcurrencyLimiter
from guardrails.observe.telemetry import Telemetry
from guardrails.observe.triage import NONE as NO_TROUBLE
from guardrails.observe.triage import (
    Diagnosis,
    EarlyWarning,
    Sample,
    Warning_,
    diagnose,
    early_warnings,
    refused_as_too_many,
)
from guardrails.policy import Policy, RouteResolver
from guardrails.retry import RetryBudget, RetrySettings, call_with_retries

__all__ = ["Guardrails"]

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("guardrails")


class Coordinator(Protocol):
    """Shares the connection budget and the breaker state among processes.

    ``attach(guard)`` is called once by the guard's constructor; ``start()`` from the
    first request, on the running event loop (it runs until ``aclose()``). It drives
    ``guard.limiter.set_limit`` with the slots it holds, and ``guard.breaker``'s
    ``force_open`` / ``force_close`` / ``hold`` with the shared state.
    """

    def attach(self, guard: Guardrails) -> None: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...


ErrorResponseFactory = Callable[[Request, str, int], "Response | None"]
"""Builds the 503 for ``(request, error, retry_after)``; ``None`` keeps the default."""

_SAMPLE_INTERVAL = 1.0
_SAMPLES_KEPT = 600

NO_REQUEST = "<no request>"
"""Route reported for guarded calls made outside any request (jobs, startup)."""


class Guardrails:
    """Keeps an app's database work inside its connection budget.

    Pass either ``concurrency`` (slots per process) or ``budget`` (a
    :class:`~guardrails.budget.ConnectionBudget`, whose ``per_process`` becomes the
    number of slots)::

        guard = gr.Guardrails(concurrency=15, queue_timeout=1.0, max_queue=64,
                              policies={"/reports/{path:path}": gr.Policy(priority="low")})
        app.add_middleware(gr.GuardrailsMiddleware, guard=guard)

    ``queue_timeout`` is how long a request may wait for a slot; ``max_queue`` how
    many may wait at once (the rest are shed at once). ``reserve_critical`` and
    ``low_watermark`` shape the priority lanes (see
    :class:`~guardrails.limiter.ConcurrencyLimiter`). ``policies`` maps Starlette
    path patterns, optionally after a method (``"POST /orders/{id}"``), to a
    :class:`~guardrails.policy.Policy`; ``default_policy`` covers everything else.
    """

    def __init__(
        self,
        *,
        concurrency: int | None = None,
        budget: ConnectionBudget | None = None,
        queue_timeout: float | timedelta = 1.0,
        max_queue: int = 64,
        reserve_critical: int | None = None,
        low_watermark: float = 0.75,
        delay_interval: float | timedelta | None = 1.5,
        delay_target: float | timedelta = 0.005,
        delay_target_holds: float = 0.25,
        policies: Mapping[str, Policy] | None = None,
        default_policy: Policy | None = None,
        breaker: BreakerSettings | None = None,
        retry: RetrySettings | None = None,
        leak_threshold: float | None = 30.0,
        health_fail_on: Iterable[str] = ("breaker_open",),
        cache: ResponseStore | None = None,
        read_only_on_open: bool = True,
        error_response: ErrorResponseFactory | None = None,
        early_warning: EarlyWarning | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        if (concurrency is None) == (budget is None):
            raise ValueError(
                "pass exactly one of concurrency=N (slots per process) or "
                "budget=ConnectionBudget(...) (its per_process becomes the slots)"
            )
        if budget is not None:
            if not isinstance(budget, ConnectionBudget):
                raise TypeError(f"budget must be a ConnectionBudget, not {budget!r}")
            concurrency = budget.per_process
        assert concurrency is not None
        self.budget = budget
        self.limiter = ConcurrencyLimiter(
            concurrency,
            max_queue=max_queue,
            queue_timeout=queue_timeout,
            reserve_critical=reserve_critical,
            low_watermark=low_watermark,
            delay_interval=delay_interval,
            delay_target=delay_target,
            delay_target_holds=delay_target_holds,
        )
        if default_policy is not None and not isinstance(default_policy, Policy):
            raise TypeError(f"default_policy must be a guardrails Policy, not {default_policy!r}")
        self.default_policy = default_policy if default_policy is not None else Policy()
        if policies is not None and not isinstance(policies, Mapping):
            raise TypeError(
                "policies must be a mapping of path pattern to Policy, e.g. "
                "{'/reports/{path:path}': Policy(priority='low')}"
            )
        self._policies = dict(policies or {})
        self._bulkheads: dict[int, tuple[Policy, str]] = {}
        self._read_only = False
        self._read_only_reason: str | None = None
        if breaker is not None and not isinstance(breaker, BreakerSettings):
            raise TypeError(f"breaker must be a guardrails BreakerSettings, not {breaker!r}")
        self.telemetry = Telemetry()
        """Counters and state-change events; add sinks with ``telemetry.add_sink``."""
        self.breaker = Breaker(breaker, on_change=self.telemetry.breaker_changed)
        if retry is not None and not isinstance(retry, RetrySettings):
            raise TypeError(f"retry must be a guardrails RetrySettings, not {retry!r}")
        self.retry_settings = retry if retry is not None else RetrySettings()
        self.retry_budget = RetryBudget(
            self.retry_settings.budget_ratio,
            self.retry_settings.budget_window,
            self.retry_settings.budget_min_retries,
        )
        if leak_threshold is not None and (
            isinstance(leak_threshold, bool)
            or not isinstance(leak_threshold, int | float)
            or not leak_threshold > 0
        ):
            raise ValueError(
                f"leak_threshold must be a positive number of seconds or None (off), "
                f"not {leak_threshold!r}"
            )
        self.leak_threshold = leak_threshold
        self._watchers: list[Any] = []
        if cache is not None and not all(
            callable(getattr(cache, name, None)) for name in ("get", "set", "delete")
        ):
            raise TypeError(
                f"cache must be a response store such as MemoryCache(max_entries=10_000), "
                f"not {cache!r}"
            )
        self.cache = cache
        """Where responses of routes with ``cache_ttl``/``stale_ttl`` are kept, or None."""
        if not isinstance(read_only_on_open, bool):
            raise TypeError(f"read_only_on_open must be True or False, not {read_only_on_open!r}")
        self.read_only_on_open = read_only_on_open
        if error_response is not None and not callable(error_response):
            raise TypeError(
                "error_response must be a callable (request, error, retry_after) -> Response "
                f"or None, not {error_response!r}"
            )
        self.error_response = error_response
        if early_warning is not None and not isinstance(early_warning, EarlyWarning):
            raise TypeError(
                f"early_warning must be a guardrails EarlyWarning, not {early_warning!r}"
            )
        self.early_warning = early_warning if early_warning is not None else EarlyWarning()
        self.samples: deque[Sample] = deque(maxlen=_SAMPLES_KEPT)
        """Once-a-second samples of the counters (the last ten minutes), for triage."""
        self.diagnosis: Diagnosis = NO_TROUBLE
        self._warned: frozenset[str] = frozenset()
        self._sampling = False
        self._sampler: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._coordinator_task: asyncio.Task[None] | None = None
        self.coordinator = coordinator
        """Shares the budget and the breaker with other processes (e.g. RedisCoordinator)."""
        if coordinator is not None:
            if not all(callable(getattr(coordinator, n, None)) for n in ("attach", "start")):
                raise TypeError(
                    f"coordinator must be a guardrails coordinator such as "
                    f"RedisCoordinator(url), not {coordinator!r}"
                )
            coordinator.attach(self)
        self.health = HealthEndpoint(self, fail_on=health_fail_on)
        """The health endpoint (an ASGI app): ``Route("/health/guardrails", guard.health)``;
        ``guard.health.live`` and ``guard.health.ready`` for orchestrator probes."""
        # Parse the patterns now so a bad one fails at construction, not on a request.
        self.route_resolver()

    @property
    def read_only(self) -> bool:
        """Whether writes are refused right now: set by hand, or while the breaker is open."""
        return self._read_only or (self.read_only_on_open and self.breaker.state != "closed")

    def set_read_only(self, enabled: bool, *, reason: str | None = None) -> None:
        """Turn read-only mode on or off at run time (e.g. during a primary failover).

        While it is on, POST/PUT/PATCH/DELETE requests to routes that need the
        database get 503 ``{"error": "read_only"}``; reads go on. ``reason`` shows in
        :meth:`snapshot`, never to clients.
        """
        enabled = bool(enabled)
        changed = enabled != self._read_only
        self._read_only = enabled
        self._read_only_reason = reason if enabled else None
        if changed:
            self.telemetry.event(
                "read_only",
                transition=True,
                enabled=enabled,
                reason=reason,
                level=logging.WARNING if enabled else logging.INFO,
                message=f"read-only mode {'on' if enabled else 'off'}"
                + (f": {reason}" if enabled and reason else ""),
            )

    # -- guarded database calls --------------------------------------------------------

    def read(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Guard an idempotent read: breaker-gated, retried on outages and transient errors.

        Use as a decorator (``@guard.read``) or a wrapper
        (``await guard.read(fetch)(conn)``). A call while the breaker is open raises
        :class:`~guardrails.errors.Unavailable` without running ``func``. Failures that
        the database may not repeat are retried, with full-jitter backoff, at most
        ``RetrySettings.attempts`` tries, within the retry budget and never past the
        request's deadline. An outage that remains raises ``Unavailable`` (the driver's
        exception is its ``__cause__``); the app's own errors propagate unchanged.
        """
        return self._wrap(func, read=True)

    def write(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Guard a write: breaker-gated, never retried, refused in read-only mode.

        In read-only mode the call raises :class:`~guardrails.errors.ReadOnly` without
        running ``func``. Otherwise as :meth:`read`, with a single attempt.
        """
        return self._wrap(func, read=False)

    def _wrap(self, func: Callable[P, Awaitable[T]], *, read: bool) -> Callable[P, Awaitable[T]]:
        if not callable(func):
            kind = "read" if read else "write"
            raise TypeError(
                f"guard.{kind} wraps an async function, not {func!r}: "
                f"@guard.{kind} above `async def ...`, or guard.{kind}(fetch)(args)"
            )

        @functools.wraps(func)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self._guarded_call(lambda: func(*args, **kwargs), read=read)

        return guarded

    async def _guarded_call(self, call: Callable[[], Awaitable[T]], *, read: bool) -> T:
        ctx = context.current()
        token = None
        if ctx is None:
            ctx = context.CallContext(NO_REQUEST)
            token = context.enter(ctx)
        try:
            if not read and self.read_only:
                retry_after = max(self.limiter.retry_after, self.breaker.retry_after)
                raise ReadOnly(
                    self._read_only_reason or "database unavailable", retry_after=retry_after
                )
            breaker = self.breaker
            call_context = ctx

            async def attempt() -> T:
                # A request holding the half-open trial makes this call the trial.
                held = call_context.trial
                trial = held if isinstance(held, Trial) and not held.done else breaker.admit()
                try:
                    result = await call()
                except BaseException as exc:
                    pending = call_context.pool_timeout
                    if pending is not None and in_chain(exc, pending):
                        call_context.pool_timeout = None
                    breaker.record(trial, exc)
                    call_context.recorded = True
                    call_context.failure = exc
                    self._note_failure(exc)
                    raise
                # A pool timeout the function caught itself is still an outage.
                pending, call_context.pool_timeout = call_context.pool_timeout, None
                breaker.record(trial, pending)
                call_context.recorded = True
                return result

            try:
                if read and self.retry_settings.attempts > 1:
                    time_left = None
                    if ctx.deadline is not None:
                        time_left = ctx.deadline - anyio.current_time()
                    return await call_with_retries(
                        attempt,
                        self.retry_settings,
                        self.retry_budget,
                        self._classify,
                        time_left=time_left,
                    )
                return await attempt()
            except Exception as exc:
                if isinstance(exc, GuardrailsError) or self._classify(exc) is not ErrorKind.OUTAGE:
                    raise
                raise Unavailable(
                    "the database is unavailable", retry_after=max(1, breaker.retry_after)
                ) from exc
        finally:
            if token is not None:
                context.leave(token)
                if ctx.pool_timeout is not None:  # outside a request: no one else will
                    self.breaker.record_outage(ctx.pool_timeout)

    def _classify(self, exc: BaseException) -> ErrorKind:
        return classify(exc, self.breaker.settings.classifiers)

    # -- pools ---------------------------------------------------------------------------

    def watch_pool(self, pool: Any, *, name: str | None = None) -> Any:
        """Watch a pool: SQLAlchemy (async) ``Engine``, ``asyncpg.Pool``, psycopg_pool pools.

        Reports its size, checked-out count, acquire waits and pool timeouts in
        :meth:`snapshot`; pool timeouts outside guarded calls count toward the breaker;
        connections held longer than ``leak_threshold`` or still checked out when their
        request finished are reported as leak suspects. Returns the watcher; its
        ``close()`` stops watching.
        """
        from guardrails.pools import watch

        self._remember_loop()
        watcher = watch(pool, sink=self, leak_threshold=self.leak_threshold, name=name)
        self._watchers.append(watcher)
        return watcher

    def pool_timeout(self, watcher: Any, exc: BaseException) -> None:
        """Called by pool watchers for each pool timeout they see (on any thread)."""
        ctx = context.current()
        if ctx is None:
            self._on_loop(self.breaker.record_outage, exc)
        else:
            # The request or guarded call records it when it ends, once, even when the
            # app catches the timeout and answers on its own.
            ctx.pool_timeout = exc

    def leak_suspect(self, watcher: Any, info: Any) -> None:
        """Called by pool watchers for each leak suspect (on any thread): logged and sent
        to every sink."""
        self._on_loop(self._report_leak, info)

    def _report_leak(self, info: Any) -> None:
        self.telemetry.event(
            "leak_suspect",
            key=f"{info.pool}:{info.route}",
            level=logging.WARNING,
            message=info.describe(),
            **info.as_dict(),
        )

    def _remember_loop(self) -> None:
        # Set up before the app runs, there is no loop yet: the first request remembers it.
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    def _on_loop(self, func: Callable[[Any], None], arg: Any) -> None:
        """Run ``func(arg)`` on the app's event loop, also when a sync pool calls from a
        worker thread: breaker listeners, probes and sinks expect the loop's thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(func, arg)
                return
        func(arg)

    def _request_finished(self, ctx: context.CallContext) -> None:
        if ctx.checkouts:
            from guardrails.pools import request_finished

            request_finished(ctx)

    async def aclose(self) -> None:
        """Stop background work (probe, sampler, coordinator) and close the response store.

        Call it on shutdown, e.g. at the end of the app's lifespan.
        """
        await self.breaker.aclose()
        task, self._sampler = self._sampler, None
        self._sampling = False
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.coordinator is not None:
            await self.coordinator.aclose()
        close_cache = getattr(self.cache, "aclose", None)
        if close_cache is not None:  # e.g. RedisCache's connections
            await close_cache()
        running, self._coordinator_task = self._coordinator_task, None
        if running is not None and not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    # -- sampling, early warnings and triage ---------------------------------------------

    def _note_failure(self, exc: BaseException) -> None:
        if refused_as_too_many(exc):
            self.telemetry.refused_total += 1

    def _start_sampler(self) -> None:
        """Start the once-a-second sampler (from the first request; needs a running loop)."""
        self._sampling = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._sampling = False
            return
        self._loop = loop
        self._sampler = loop.create_task(self._sample_forever(), name="guardrails-sampler")
        if self.coordinator is not None:
            self._coordinator_task = loop.create_task(
                self.coordinator.start(), name="guardrails-coordinator"
            )

    async def _sample_forever(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(_SAMPLE_INTERVAL)

    def sample(self) -> Sample:
        """Record the counters now and update the triage; the sampler calls it each second."""
        limiter = self.limiter
        pools = [watcher.snapshot() for watcher in self._watchers]
        sample = Sample(
            at=time.monotonic(),
            arrivals_total=limiter.admitted_total + limiter.shed_total,
            admitted_total=limiter.admitted_total,
            in_flight=limiter.in_flight,
            limit=limiter.limit,
            queued=limiter.queued,
            checked_out=sum(int(p.get("checked_out") or 0) for p in pools) if pools else None,
            pool_size=sum(int(p.get("size") or 0) for p in pools) if pools else None,
            pool_timeouts_total=sum(int(p.get("timeouts_total") or 0) for p in pools),
            connects_total=sum(int(p.get("connects_total") or 0) for p in pools),
            leak_suspects_total=sum(int(p.get("leak_suspects_total") or 0) for p in pools),
            refused_total=self.telemetry.refused_total,
            retry_remaining=self.retry_budget.remaining(),
        )
        self.samples.append(sample)
        warned = frozenset(warning.check for warning in self.warnings())
        if warned != self._warned:
            self.telemetry.event(
                "early_warning",
                transition=True,
                checks=sorted(warned),
                was=sorted(self._warned),
                level=logging.WARNING if warned - self._warned else logging.INFO,
                message="early warning: " + (", ".join(sorted(warned)) or "all clear"),
            )
            self._warned = warned
        diagnosis = diagnose(self.samples, self.early_warning.triage_window)
        if diagnosis.kind != self.diagnosis.kind:
            self.telemetry.event(
                "triage",
                transition=True,
                kind=diagnosis.kind,
                was=self.diagnosis.kind,
                numbers=diagnosis.numbers,
                level=logging.INFO if diagnosis.kind == "none" else logging.WARNING,
                message=f"pool triage: {diagnosis.kind}: {diagnosis.evidence}",
            )
        self.diagnosis = diagnosis
        return sample

    def warnings(self) -> list[Warning_]:
        """The early warnings that hold now (see :class:`~guardrails.EarlyWarning`)."""
        window = self.early_warning.window
        now = time.monotonic()
        waits = self.telemetry.queue_wait.recent(within=window, now=now)
        acquire = [
            p["acquire_wait_p95_seconds"]
            for p in (watcher.snapshot() for watcher in self._watchers)
            if p.get("acquire_wait_p95_seconds") is not None
        ]
        return early_warnings(
            list(self.samples),
            self.early_warning,
            queue_timeout=self.limiter.queue_timeout,
            recent_queue_waits=waits,
            acquire_p95=max(acquire) if acquire else None,
        )

    def route_resolver(self) -> RouteResolver:
        """A fresh resolver of requests to :class:`~guardrails.policy.ResolvedRoute`."""
        return RouteResolver(self._policies, self.default_policy, self._bulkhead_for)

    def snapshot(self) -> dict[str, Any]:
        """The guard's state as plain data, for health endpoints, logs and tests."""
        limiter = self.limiter.snapshot()
        breaker = self.breaker.snapshot()
        warnings = self.warnings()
        diagnosis = self.diagnosis
        snapshot: dict[str, Any] = {
            "limiter": limiter,
            "breaker": breaker,
            "read_only": {
                "enabled": self.read_only,
                "reason": self._read_only_reason,
                "automatic": not self._read_only and self.read_only,
            },
        }
        if any(FAIL_CONDITIONS[name](snapshot) for name in self.health.fail_on):
            status = "fail"
        elif (
            self.read_only
            or limiter["queued"]
            or breaker["state"] != "closed"
            or warnings
            or diagnosis.kind != "none"
        ):
            status = "warn"
        else:
            status = "pass"
        return {
            "status": status,
            **snapshot,
            "retry": self.retry_budget.snapshot(),
            "cache": self.cache.snapshot() if self.cache is not None else None,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "pools": [watcher.snapshot() for watcher in self._watchers],
            "telemetry": self.telemetry.snapshot(),
            "warnings": [warning.to_dict() for warning in warnings],
            "triage": diagnosis.to_dict(),
            "coordinator": self.coordinator.snapshot() if self.coordinator is not None else None,
        }

    def _bulkhead_for(self, chosen: Policy, template: str) -> str | None:
        if chosen.max_concurrency is None:
            return None
        # Routes sharing one Policy object share its sub-limit; keep the object alive
        # so its id cannot be reused by another policy.
        known = self._bulkheads.get(id(chosen))
        if known is not None:
            return known[1]
        taken = {name for _, name in self._bulkheads.values()}
        name = template if template not in taken else f"{template}#{len(taken) + 1}"
        self._bulkheads[id(chosen)] = (chosen, name)
        return self.limiter.bulkhead(name, chosen.max_concurrency)
