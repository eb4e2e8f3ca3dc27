"""Route sub-limits: the bulkhead each ``Policy(max_concurrency=...)`` gets in the limiter.

Routes that share one :class:`~guardrails.policy.Policy` object share its bulkhead,
named after the first route that asked for it; telemetry learns which routes wait in
which bulkhead.
"""

from __future__ import annotations

from guardrails.limiter import ConcurrencyLimiter
from guardrails.observe.telemetry import Telemetry
from guardrails.policy import Policy

__all__ = ["PolicyBulkheads"]


class PolicyBulkheads:
    """Gives each policy with ``max_concurrency`` one bulkhead of ``limiter``."""

    def __init__(self, limiter: ConcurrencyLimiter, telemetry: Telemetry) -> None:
        self._limiter = limiter
        self._telemetry = telemetry
        # Keyed by id, with the policy kept alive so that its id cannot be reused.
        self._known: dict[int, tuple[Policy, str]] = {}

    def __call__(self, chosen: Policy, template: str) -> str | None:
        """The bulkhead for requests to ``template`` under ``chosen``; None without one."""
        if chosen.max_concurrency is None:
            return None
        known = self._known.get(id(chosen))
        if known is not None:
            self._telemetry.route_in_bulkhead(template, known[1])
            return known[1]
        taken = {name for _, name in self._known.values()}
        name = template if template not in taken else f"{template}#{len(taken) + 1}"
        self._known[id(chosen)] = (chosen, name)
        self._telemetry.route_in_bulkhead(template, name)
        return self._limiter.bulkhead(name, chosen.max_concurrency)
