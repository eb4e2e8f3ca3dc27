"""The ``Guardrails`` object: the one place where limiter, policies and modes are put together.

Build one per process, hand it to :class:`~guardrails.asgi.middleware.GuardrailsMiddleware`,
and ask it for :meth:`Guardrails.snapshot` to see what it is doing. It builds the parts
and hands work to them: ``guard.read`` / ``guard.write`` to :mod:`guardrails.guarded_calls`,
the checks on its arguments to :mod:`guardrails.guard_checks`, what pool watchers report
to :mod:`guardrails.pool_reports`, route sub-limits to :mod:`guardrails.bulkheads`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal, ParamSpec, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response

from guardrails.adaptive import AdaptiveLimit
from guardrails.asgi.health import HealthEndpoint
from guardrails.background import Background, Job
from guardrails.breaker import CLOSED, Breaker, BreakerSettings
from guardrails.budget import ConnectionBudget
from guardrails.bulkheads import PolicyBulkheads
from guardrails.coordination.protocol import Coordinator
from guardrails.errors import ErrorKind, classify
from guardrails.fallback import ResponseStore
from guardrails.guard_checks import (
    checked_coordinator,
    checked_error_response,
    checked_flag,
    checked_instance,
    checked_policies,
    checked_slots,
    checked_store,
    credential_headers,
)
from guardrails.guarded_calls import guarded
from guardrails.limiter import ConcurrencyLimiter
from guardrails.observe.sampler import SAMPLE_INTERVAL, Sampler
from guardrails.observe.telemetry import Telemetry
from guardrails.observe.triage import Diagnosis, EarlyWarning, Sample, Warning_, refused_as_too_many
from guardrails.policy import Policy
from guardrails.pool_reports import PoolReports
from guardrails.pools import checked_threshold
from guardrails.retry import RetryBudget, RetrySettings
from guardrails.routing import RouteResolver

__all__ = ["Guardrails"]

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("guardrails")


ErrorResponseFactory = Callable[[Request, str, int], "Response | None"]
"""Builds the 503 for ``(request, error, retry_after)``; ``None`` keeps the default."""


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
    ``adaptive`` (an :class:`~guardrails.adaptive.AdaptiveLimit`) lets the number of
    slots follow what the database serves well, below ``concurrency``.
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
        adaptive: AdaptiveLimit | None = None,
        policies: Mapping[str, Policy] | None = None,
        default_policy: Policy | None = None,
        breaker: BreakerSettings | None = None,
        retry: RetrySettings | None = None,
        leak_threshold: float | None = 30.0,
        health_fail_on: Iterable[str] = ("breaker_open",),
        cache: ResponseStore | Literal["memory"] | None = "memory",
        read_only_on_open: bool = True,
        error_response: ErrorResponseFactory | None = None,
        early_warning: EarlyWarning | None = None,
        coordinator: Coordinator | None = None,
        identity_headers: Iterable[str] = (),
    ) -> None:
        # Each argument is checked where it is first used, with a message saying what to
        # change (guard_checks); the parts built from the others check their own.
        self.budget = budget
        self.limiter = ConcurrencyLimiter(
            checked_slots(concurrency, budget),
            max_queue=max_queue,
            queue_timeout=queue_timeout,
            reserve_critical=reserve_critical,
            low_watermark=low_watermark,
            delay_interval=delay_interval,
            delay_target=delay_target,
            delay_target_holds=delay_target_holds,
            adaptive=adaptive,
        )
        self.default_policy = checked_instance(default_policy, Policy, "default_policy") or Policy()
        self._policies = checked_policies(policies)
        self._read_only = False
        self._read_only_reason: str | None = None
        breaker = checked_instance(breaker, BreakerSettings, "breaker")
        self.telemetry = Telemetry(self.limiter)
        """Counters and state-change events; add sinks with ``telemetry.add_sink``."""
        self._bulkheads = PolicyBulkheads(self.limiter, self.telemetry)
        self.breaker = Breaker(breaker, on_change=self.telemetry.breaker_changed)
        self.retry_settings = checked_instance(retry, RetrySettings, "retry") or RetrySettings()
        self.retry_budget = RetryBudget(
            self.retry_settings.budget_ratio,
            self.retry_settings.budget_window,
            self.retry_settings.budget_min_retries,
        )
        self.leak_threshold = checked_threshold(leak_threshold)
        self._pools = PoolReports(self)
        self.cache: ResponseStore | None = checked_store(cache)
        """Where responses of routes with ``cache_ttl``/``stale_ttl`` are kept: by default
        an in-memory store of 10,000 entries; None when switched off with ``cache=None``."""
        self.credential_headers = credential_headers(identity_headers)
        """Request headers that say who is asking (lowercase): such requests are cached
        only under a policy's ``cache_key``; the defaults plus ``identity_headers``."""
        self.read_only_on_open = checked_flag(read_only_on_open, "read_only_on_open")
        self.error_response = checked_error_response(error_response)
        early_warning = checked_instance(early_warning, EarlyWarning, "early_warning")
        self.early_warning = early_warning or EarlyWarning()
        self.sampler = Sampler(
            self.limiter,
            self.telemetry,
            self.retry_budget,
            lambda: [watcher.snapshot() for watcher in self._pools.watchers],
            self.early_warning,
            self.breaker,
        )
        """Samples the counters each second for the early warnings and the triage."""
        self.background = Background(self._background_jobs)
        """The sampler, the breaker's probe and the coordinator: see :meth:`lifespan`."""
        self.coordinator = checked_coordinator(coordinator)
        """Shares the budget and the breaker with other processes (e.g. RedisCoordinator)."""
        if coordinator is not None:
            coordinator.attach(self)
        self.health = HealthEndpoint(self, fail_on=health_fail_on)
        """The health endpoint (an ASGI app): ``Route("/health/guardrails", guard.health)``;
        ``guard.health.live`` and ``guard.health.ready`` for orchestrator probes."""
        # Parse the patterns now so a bad one fails at construction, not on a request.
        self.route_resolver()

    @property
    def read_only(self) -> bool:
        """Whether writes are refused right now: set by hand, or while the breaker is open."""
        return self._read_only or (self.read_only_on_open and self.breaker.state is not CLOSED)

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
        return guarded(self, func, read=True)

    def write(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Guard a write: breaker-gated, never retried, refused in read-only mode.

        In read-only mode the call raises :class:`~guardrails.errors.ReadOnly` without
        running ``func``. Otherwise as :meth:`read`, with a single attempt.
        """
        return guarded(self, func, read=False)

    def classify(self, exc: BaseException) -> ErrorKind:
        """What ``exc`` says about the database, with this guard's extra classifiers."""
        return classify(exc, self.breaker.settings.classifiers)

    def note_failure(self, exc: BaseException) -> None:
        """Count what a failed database call says for triage (e.g. too many connections)."""
        if refused_as_too_many(exc):
            self.telemetry.refused_total += 1

    # -- pools ---------------------------------------------------------------------------

    def watch_pool(self, pool: Any, *, name: str | None = None) -> Any:
        """Watch a pool: SQLAlchemy (async) ``Engine``, ``asyncpg.Pool``, psycopg_pool pools.

        Reports its size, checked-out count, acquire waits and pool timeouts in
        :meth:`snapshot`; pool timeouts outside guarded calls count toward the breaker;
        connections held longer than ``leak_threshold`` or still checked out when their
        request finished are reported as leak suspects. Returns the watcher; its
        ``close()`` stops watching.
        """
        return self._pools.watch(pool, name)

    @property
    def watchers(self) -> tuple[Any, ...]:
        """The :class:`~guardrails.pools.PoolWatcher` of each pool given to
        :meth:`watch_pool`, oldest first (closed ones included)."""
        return tuple(self._pools.watchers)

    @property
    def watching(self) -> bool:
        """Whether any pool is watched (then a request proves the database answered only
        when a watched pool handed it a connection)."""
        return bool(self._pools.watchers)

    def pool_timeout(self, watcher: Any, exc: BaseException) -> None:
        """Called by pool watchers for each pool timeout they see (on any thread)."""
        self._pools.pool_timeout(watcher, exc)

    def leak_suspect(self, watcher: Any, info: Any) -> None:
        """Called by pool watchers for each leak suspect (on any thread): logged and sent
        to every sink."""
        self._pools.leak_suspect(info)

    # -- background work -----------------------------------------------------------------

    async def __aenter__(self) -> Guardrails:
        """Run the background work (sampler, probe, coordinator) until the block ends."""
        self._pools.remember_loop()
        await self.background.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """A Starlette/FastAPI lifespan running the guard's background work:
        ``Starlette(lifespan=guard.lifespan)``; or ``async with guard:`` in your own."""
        async with self:
            yield

    def _background_jobs(self) -> list[Job]:
        jobs: list[Job] = [self._sample_forever, self.breaker.run_probe]
        if self.coordinator is not None:
            jobs.append(self.coordinator.start)
        return jobs

    async def _sample_forever(self) -> None:
        self._pools.remember_loop()
        while True:
            self.sampler.sample()
            await anyio.sleep(SAMPLE_INTERVAL)

    async def aclose(self) -> None:
        """Stop background work (probe, sampler, coordinator) and close the response store.

        ``async with guard`` and ``guard.lifespan`` call it on the way out.
        """
        if self.coordinator is not None:
            await self.coordinator.aclose()  # gives the leased slots back first
        await self.background.aclose()
        await self.breaker.aclose()
        close_cache = getattr(self.cache, "aclose", None)
        if close_cache is not None:  # e.g. RedisCache's connections
            await close_cache()

    # -- sampling, early warnings and triage ---------------------------------------------

    @property
    def samples(self) -> Sequence[Sample]:
        """Once-a-second samples of the counters (the last ten minutes), for triage."""
        return self.sampler.samples

    @property
    def diagnosis(self) -> Diagnosis:
        """What the triage makes of the recent samples (exhaustion, leak, storm, none)."""
        return self.sampler.diagnosis

    def sample(self) -> Sample:
        """Record the counters now and update the triage; the sampler calls it each second."""
        return self.sampler.sample()

    def warnings(self) -> list[Warning_]:
        """The early warnings that hold now (see :class:`~guardrails.EarlyWarning`)."""
        return self.sampler.warnings()

    @property
    def read_only_reason(self) -> str | None:
        """Why read-only mode was turned on by hand, if it is."""
        return self._read_only_reason

    def route_resolver(self) -> RouteResolver:
        """A fresh resolver of requests to :class:`~guardrails.policy.ResolvedRoute`."""
        return RouteResolver(self._policies, self.default_policy, self._bulkheads)

    def snapshot(self) -> dict[str, Any]:
        """The guard's state as plain data, for health endpoints, logs and tests."""
        snapshot: dict[str, Any] = {
            "status": "pass",  # judged below, once the rest is known
            "limiter": self.limiter.snapshot(),
            "breaker": self.breaker.snapshot(),
            "read_only": {
                "enabled": self.read_only,
                "reason": self._read_only_reason,
                "automatic": not self._read_only and self.read_only,
            },
            "retry": self.retry_budget.snapshot(),
            "cache": self.cache.snapshot() if self.cache is not None else None,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "pools": [watcher.snapshot() for watcher in self._pools.watchers],
            "telemetry": self.telemetry.snapshot(),
            "warnings": [warning.to_dict() for warning in self.warnings()],
            "triage": self.diagnosis.to_dict(),
            "coordinator": self.coordinator.snapshot() if self.coordinator is not None else None,
            "outbound": [transport.snapshot() for transport in self._outbound],
        }
        snapshot["status"] = self.health.judge(snapshot)[0]
        return snapshot

    # -- outbound calls (GuardedTransport) -----------------------------------------------

    _outbound: tuple[Any, ...] = ()

    @property
    def outbound(self) -> tuple[Any, ...]:
        """The :class:`~guardrails.GuardedTransport` objects reporting to this guard."""
        return self._outbound

    def register_outbound(self, transport: Any) -> None:
        """Show ``transport``'s origins in :meth:`snapshot`, health and metrics.

        ``GuardedTransport(guard=guard)`` calls it. Names are unique per guard; a closed
        transport (a client closed at the end of a lifespan) gives its name up.
        """
        name = transport.name
        if any(t.name == name and t is not transport and not t.closed for t in self._outbound):
            raise ValueError(
                f"this guard already has an open outbound transport named {name!r}: give "
                f"each client its own, e.g. GuardedTransport(guard=guard, name='payments')"
            )
        self._outbound = (*(t for t in self._outbound if t.name != name), transport)
