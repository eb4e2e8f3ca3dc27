"""One place every component reports to: counters, a histogram, and state-change events.

Components never import a metrics library. They call :class:`Telemetry`, which keeps
plain counters (cheap enough for the request path) and hands state changes (breaker
transitions, read-only on/off, leak suspects, triage changes) to its sinks. The
stdlib-logging sink is always there; :mod:`guardrails.observe.prometheus` reads the counters
at scrape time, so metrics cost nothing between scrapes.

Labels are bounded by construction: routes are templates (``/items/{id}``), never raw
paths, and reasons come from fixed sets.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from guardrails.observe.stats import percentile

if TYPE_CHECKING:
    from guardrails.limiter import ConcurrencyLimiter

__all__ = [
    "LIMITER_REASONS",
    "OUTAGE_REASONS",
    "WAIT_BUCKETS",
    "Histogram",
    "LoggingSink",
    "Telemetry",
]

logger = logging.getLogger("guardrails")

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the wait histograms' buckets."""

Sink = Callable[[str, dict[str, Any]], None]
"""Receives ``(event, fields)`` for each state change."""

LIMITER_REASONS = frozenset({"queue_full", "queue_timeout", "deadline", "evicted"})
"""Shed reasons of the concurrency limiter (a global slot or a bulkhead's)."""
OUTAGE_REASONS = frozenset({"breaker_open", "outage"})
"""Refusals because the database was down: the breaker refused the request before it
ran, or its database call failed with an outage and it was answered 503."""


class Histogram:
    """Cumulative-bucket histogram of seconds, plus a small window for recent percentiles."""

    __slots__ = ("_recent", "_recent_at", "bounds", "count", "counts", "sum")

    _WINDOW = 512

    def __init__(self, bounds: tuple[float, ...] = WAIT_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0
        self._recent: list[tuple[float, float]] = []
        self._recent_at = 0

    def observe(self, seconds: float, now: float | None = None) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds
        sample = (time.monotonic() if now is None else now, seconds)
        if len(self._recent) < self._WINDOW:
            self._recent.append(sample)
        else:
            self._recent[self._recent_at] = sample
            self._recent_at = (self._recent_at + 1) % self._WINDOW

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        pairs: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            pairs.append((repr(float(bound)), running))
        pairs.append(("+Inf", running + self.counts[-1]))
        return pairs

    def recent(self, within: float, now: float | None = None) -> list[float]:
        """Observations from the last ``within`` seconds (at most the last 512)."""
        cutoff = (time.monotonic() if now is None else now) - within
        return [value for at, value in self._recent if at >= cutoff]

    def recent_quantile(self, q: float, within: float, now: float | None = None) -> float | None:
        """The ``q`` quantile (nearest rank, see :mod:`guardrails.observe.stats`) of
        observations from the last ``within`` seconds, if any."""
        values = self.recent(within, now)
        return percentile(values, q) if values else None


class LoggingSink:
    """Logs each state change once, as one structured record on the ``guardrails`` logger.

    Repeats of the same event within ``min_interval`` seconds are folded into a count
    reported with the next record, so an outage cannot flood the logs.
    """

    def __init__(self, min_interval: float = 10.0, log: logging.Logger = logger) -> None:
        self.min_interval = min_interval
        self.log = log
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if fields.get("logged"):
            return  # the component logged it itself
        key = f"{event}:{fields.get('key', '')}"
        now = time.monotonic()
        last = self._last.get(key)
        repeat = fields.get("transition") is not True and last is not None
        if repeat and last is not None and now - last < self.min_interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        message = fields.get("message", event)
        if suppressed:
            message = f"{message} ({suppressed} more like it not logged)"
        level = fields.get("level", logging.INFO)
        exc_info = fields.get("exc_info")
        record = {
            name: value
            for name, value in fields.items()
            if name not in ("exc_info", "level", "message", "logged")
        }
        self.log.log(level, "%s", message, extra={"guardrails": {"event": event, **record}})
        if exc_info is not None:
            # A driver's text can carry SQL parameters (user data): the traceback is
            # kept for DEBUG, the record above names only the exception's type.
            self.log.debug("%s: traceback", event, exc_info=exc_info)


class Telemetry:
    """Counters, wait histograms and state-change events for one guard."""

    def __init__(self, limiter: ConcurrencyLimiter | None = None) -> None:
        self.sinks: list[Sink] = [LoggingSink()]
        self.limiter = limiter
        """The guard's limiter: tells a bulkhead's sheds from the global slots' ones."""
        self.shed: dict[tuple[str, str], int] = {}
        """503s the guard answered itself, by (reason, route template)."""
        self.outage_refused_total = 0
        """503s because the database was down (reasons in :data:`OUTAGE_REASONS`)."""
        self.bulkhead_routes: dict[str, str] = {}
        """Route template -> the bulkhead (a policy's ``max_concurrency``) it waits in."""
        self.shed_by_bulkhead: dict[str, int] = {}
        """Sheds by a full bulkhead while the global slots had room, by bulkhead name:
        the route's own ``max_concurrency`` refused them, not the pool's budget."""
        self.breaker_opened_by: dict[tuple[str, str], int] = {}
        """Breaker openings by (route, pool) of the outage that opened it (``""`` when
        unknown: the probe, a coordinator, work outside a request)."""
        self.fallbacks: dict[tuple[str, str], int] = {}
        """Fallback answers by (kind, route template): ``stale``, ``rejected``."""
        self.breaker_transitions: dict[str, int] = {}
        """Breaker transitions by the state entered."""
        self.queue_wait = Histogram()
        """Seconds waited for a slot, by requests that had to queue."""
        self.queued_admitted = 0
        """Requests admitted after queueing (each one is in ``queue_wait``)."""
        self.refused_total = 0
        """Connections the database refused as too many (SQLSTATE 53300 and kin)."""

    def add_sink(self, sink: Sink) -> None:
        """Also send state changes to ``sink(event, fields)``."""
        self.sinks.append(sink)

    def event(self, event: str, **fields: Any) -> None:
        """Report a state change to every sink; a failing sink never breaks the caller."""
        for sink in self.sinks:
            try:
                sink(event, fields)
            except Exception:  # a broken sink must not take a request down
                logger.exception("guardrails telemetry sink %r failed", sink)

    def count_shed(self, reason: str, route: str) -> None:
        """Count a 503 answered by the guard."""
        key = (reason, route)
        self.shed[key] = self.shed.get(key, 0) + 1
        if reason in OUTAGE_REASONS:
            self.outage_refused_total += 1
        elif self.bulkhead_routes and reason in LIMITER_REASONS:
            bulkhead = self.bulkhead_routes.get(route)
            if bulkhead is not None and self._bulkhead_was_full(bulkhead):
                self.shed_by_bulkhead[bulkhead] = self.shed_by_bulkhead.get(bulkhead, 0) + 1

    def route_in_bulkhead(self, route: str, bulkhead: str) -> None:
        """Note that requests to ``route`` wait in ``bulkhead`` (the guard tells it)."""
        self.bulkhead_routes[route] = bulkhead

    def _bulkhead_was_full(self, bulkhead: str) -> bool:
        # Counted right after the limiter shed, with no await in between: the gates
        # are as they were when it decided. A full bulkhead beside global slots with
        # room shed it; with both full it counts as the global slots' (exhaustion).
        limiter = self.limiter
        if limiter is None:
            return False
        snapshot = limiter.snapshot()
        gate = snapshot["bulkheads"].get(bulkhead)
        if gate is None:
            return False
        return bool(
            gate["in_flight"] >= gate["limit"] and snapshot["in_flight"] < snapshot["limit"]
        )

    def count_fallback(self, kind: str, route: str) -> None:
        """Count a fallback answer (a stale replay or a rejection)."""
        key = (kind, route)
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def observe_queue_wait(self, seconds: float) -> None:
        """Record how long an admitted request waited in the queue."""
        self.queued_admitted += 1
        self.queue_wait.observe(seconds)

    def breaker_changed(self, old: str | None, new: str, snapshot: dict[str, Any]) -> None:
        """Count a breaker transition (the breaker logs it itself) and, for an opening,
        the route and pool of the outage that opened it."""
        self.breaker_transitions[new] = self.breaker_transitions.get(new, 0) + 1
        opened_by = snapshot.get("opened_by") if new == "open" else None
        if new == "open":
            cause = opened_by or {}
            key = (cause.get("route") or "", cause.get("pool") or "")
            self.breaker_opened_by[key] = self.breaker_opened_by.get(key, 0) + 1
        self.event(
            "breaker_state",
            transition=True,
            old=old,
            new=new,
            retry_after=snapshot.get("retry_after"),
            opened_by=opened_by,
            logged=True,
        )

    def snapshot(self) -> dict[str, Any]:
        """Counters as plain data."""
        return {
            "shed": [
                {"reason": reason, "route": route, "count": count}
                for (reason, route), count in sorted(self.shed.items())
            ],
            "fallbacks": [
                {"kind": kind, "route": route, "count": count}
                for (kind, route), count in sorted(self.fallbacks.items())
            ],
            "breaker_transitions": dict(self.breaker_transitions),
            "breaker_opened_by": [
                {"route": route or None, "pool": pool or None, "count": count}
                for (route, pool), count in sorted(self.breaker_opened_by.items())
            ],
            "outage_refused_total": self.outage_refused_total,
            "shed_by_bulkhead": dict(self.shed_by_bulkhead),
            "queue_wait": {"count": self.queue_wait.count, "sum": self.queue_wait.sum},
        }
