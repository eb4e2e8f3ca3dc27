"""The ``Guardrails`` object: the one place where limiter, policies and modes are put together.

Build one per process, hand it to :class:`~guardrails.middleware.GuardrailsMiddleware`,
and ask it for :meth:`Guardrails.snapshot` to see what it is doing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from guardrails.budget import ConnectionBudget
from guardrails.limiter import ConcurrencyLimiter
from guardrails.policy import Policy, RouteResolver

__all__ = ["Guardrails"]


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
        policies: Mapping[str, Policy] | None = None,
        default_policy: Policy | None = None,
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
        # Parse the patterns now so a bad one fails at construction, not on a request.
        self.route_resolver()

    @property
    def read_only(self) -> bool:
        """Whether unsafe requests to database routes are refused right now."""
        return self._read_only

    def set_read_only(self, enabled: bool, *, reason: str | None = None) -> None:
        """Turn read-only mode on or off at run time (e.g. during a primary failover).

        While it is on, POST/PUT/PATCH/DELETE requests to routes that need the
        database get 503 ``{"error": "read_only"}``; reads go on. ``reason`` shows in
        :meth:`snapshot`, never to clients.
        """
        self._read_only = bool(enabled)
        self._read_only_reason = reason if enabled else None

    def route_resolver(self) -> RouteResolver:
        """A fresh resolver of requests to :class:`~guardrails.policy.ResolvedRoute`."""
        return RouteResolver(self._policies, self.default_policy, self._bulkhead_for)

    def snapshot(self) -> dict[str, Any]:
        """The guard's state as plain data, for health endpoints, logs and tests."""
        limiter = self.limiter.snapshot()
        status = "warn" if self._read_only or limiter["queued"] else "pass"
        return {
            "status": status,
            "limiter": limiter,
            "read_only": {"enabled": self._read_only, "reason": self._read_only_reason},
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "pools": [],
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
