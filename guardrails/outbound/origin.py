"""One origin's state: its breaker, its bulkhead, its retry budget and its counters.

An origin is ``(scheme, host, port)``: every URL on it shares one breaker, so one slow
endpoint can open it for the rest, as for a database. Origins never share anything with
each other, nor with the guard's database breaker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import httpx

from guardrails.breaker import Breaker, Trial
from guardrails.errors import Unavailable
from guardrails.observe.telemetry import Histogram
from guardrails.outbound.errors import OriginUnavailable, Refusal
from guardrails.outbound.outcome import breaker_settings
from guardrails.outbound.settings import OutboundSettings
from guardrails.retry import RetryBudget

__all__ = ["Origin", "origin_label"]

CLOSED = "closed"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of the outbound latency histogram's buckets."""

StateListener = Callable[[str | None, str, dict[str, Any]], None]


def origin_label(url: httpx.URL) -> str:
    """``scheme://host:port`` of ``url``, the default port spelled out; no path, no user."""
    host = url.host
    if ":" in host:
        host = f"[{host}]"
    port = url.port
    if port is None:
        port = 443 if url.scheme in ("https", "wss") else 80
    return f"{url.scheme}://{host}:{port}"


class Origin:
    """The breaker, bulkhead, retry budget and counters of one origin of one transport."""

    __slots__ = (
        "attempts_total",
        "breaker",
        "budget",
        "calls_total",
        "failures_total",
        "in_flight",
        "label",
        "latency",
        "refused",
        "retries_total",
        "settings",
        "slots",
    )

    def __init__(
        self, label: str, settings: OutboundSettings, on_change: StateListener | None
    ) -> None:
        self.label = label
        """``scheme://host:port``."""
        self.settings = settings
        self.breaker = Breaker(
            breaker_settings(settings.breaker), name=f"outbound {label}", on_change=on_change
        )
        retry = settings.retry
        self.budget = RetryBudget(retry.budget_ratio, retry.budget_window, retry.budget_min_retries)
        self.slots = (
            anyio.Semaphore(settings.max_concurrency)
            if settings.max_concurrency is not None
            else None
        )
        self.in_flight = 0
        """Attempts sent and not yet answered in full (their response not yet closed)."""
        self.calls_total = 0
        """Calls made through the transport to this origin (retries not counted)."""
        self.attempts_total = 0
        """Requests handed to the inner transport: first tries and retries."""
        self.failures_total = 0
        """Attempts that ended in an outage (counted by the breaker)."""
        self.retries_total = 0
        """Retries made."""
        self.refused = dict.fromkeys(Refusal, 0)
        """Calls refused (or cut short by the deadline), by reason."""
        self.latency = Histogram(LATENCY_BUCKETS)
        """Seconds from a call's start to its response headers (or its failure)."""

    @property
    def idle(self) -> bool:
        """Nothing in flight and the breaker closed: the state can be dropped and made anew."""
        return self.in_flight == 0 and self.breaker.state == CLOSED

    def refuse(self, reason: Refusal, retry_after: int = 1) -> OriginUnavailable:
        """Count a refusal and build the exception that says so."""
        self.refused[reason] += 1
        return OriginUnavailable(self.label, reason, retry_after=retry_after)

    def admit(self) -> Trial | None:
        """Ask the breaker for this attempt; raise :class:`OriginUnavailable` if it is open."""
        try:
            return self.breaker.admit()
        except Unavailable:
            raise self.refuse(Refusal.BREAKER_OPEN, self.breaker.retry_after) from None

    async def enter(self, deadline: float | None) -> None:
        """Take a place among the calls in flight: at once, or after a short wait.

        Waits at most ``queue_timeout`` seconds and never past ``deadline``; then raises
        :class:`OriginUnavailable` (``queue_timeout`` or ``deadline``).
        """
        slots = self.slots
        if slots is not None:
            try:
                slots.acquire_nowait()
            except anyio.WouldBlock:
                wait = self.settings.queue_timeout
                reason = Refusal.QUEUE_TIMEOUT
                if deadline is not None and deadline - anyio.current_time() < wait:
                    wait = deadline - anyio.current_time()
                    reason = Refusal.DEADLINE
                with anyio.move_on_after(max(0.0, wait)) as scope:
                    await slots.acquire()
                if scope.cancelled_caught:
                    raise self.refuse(reason) from None
        self.in_flight += 1

    def leave(self) -> None:
        """Give back the place taken by :meth:`enter`."""
        self.in_flight -= 1
        if self.slots is not None:
            self.slots.release()

    def snapshot(self) -> dict[str, Any]:
        """State and counters as plain data (for health, metrics and tests)."""
        return {
            "origin": self.label,
            "breaker": self.breaker.snapshot(),
            "in_flight": self.in_flight,
            "max_concurrency": self.settings.max_concurrency,
            "calls_total": self.calls_total,
            "attempts_total": self.attempts_total,
            "failures_total": self.failures_total,
            "retries_total": self.retries_total,
            "refused": {reason.value: count for reason, count in self.refused.items()},
            "retry": self.budget.snapshot(),
            "latency": {
                "buckets": self.latency.cumulative(),
                "sum": self.latency.sum,
                "count": self.latency.count,
            },
        }
