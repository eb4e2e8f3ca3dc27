"""The guard's counters at one moment: what the sampler records and the triage reads.

A :class:`Sample` is plain data, so early warnings and triage are pure functions of a
series of them, tested on recorded series as well as live ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BulkheadSample", "Sample", "last_seconds", "rate_of"]


@dataclass(frozen=True, slots=True)
class BulkheadSample:
    """One bulkhead (a policy's ``max_concurrency``) at one moment."""

    name: str
    """The bulkhead's name: the first route template that uses the policy."""
    limit: int
    in_flight: int
    shed_total: int
    """Requests it shed while the global slots had room (only grows)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """The guard's counters at one moment (cumulative ``*_total`` counters only grow)."""

    at: float
    """Monotonic seconds."""
    arrivals_total: int
    """Requests that asked for a slot (admitted or shed)."""
    admitted_total: int
    in_flight: int
    limit: int
    queued: int
    checked_out: int | None
    """Connections checked out of the watched pools, or None without a watcher."""
    pool_size: int | None
    pool_timeouts_total: int
    connects_total: int
    """New database connections opened by the watched pools."""
    leak_suspects_total: int
    refused_total: int
    """Connections the database refused as too many (SQLSTATE 53300 and kin)."""
    retry_remaining: int
    breaker: str = "closed"
    """The breaker's state: ``"closed"``, ``"open"`` or ``"half_open"``."""
    outage_refused_total: int = 0
    """Requests answered 503 because the database was down: refused by the open breaker
    (most before they reached the limiter), or failed by an outage once admitted."""
    opened_by: str | None = None
    """What opened the breaker, in words (its route and pool), while it is not closed."""
    bulkheads: tuple[BulkheadSample, ...] = ()
    """The bulkheads; their sheds are part of ``arrivals_total - admitted_total``."""
    ceiling: int | None = None
    """With an adaptive limit, the configured limit it may not exceed; None when fixed."""
    baseline: float | None = None
    """With an adaptive limit, the seconds a slot is held when the database is healthy."""
    hold: float | None = None
    """With an adaptive limit, the median hold time of its last window."""


def last_seconds(samples: Sequence[Sample], seconds: float) -> list[Sample]:
    """The samples of the last ``seconds`` (counted back from the newest)."""
    if not samples:
        return []
    cutoff = samples[-1].at - seconds
    return [s for s in samples if s.at >= cutoff]


def rate_of(first: Sample, last: Sample, field: str) -> float:
    """How fast the counter ``field`` grew from ``first`` to ``last``, per second."""
    elapsed = last.at - first.at
    if elapsed <= 0:
        return 0.0
    return float(getattr(last, field) - getattr(first, field)) / elapsed
