"""Slot leases: what a process asks Redis for, and how many slots it may use meanwhile.

Redis keeps one lease per process (``scripts/lease.lua``): the slots it holds on record,
what it needed lately, and when the lease expires unless renewed. A process asks for
what it used lately plus ``batch`` spare slots; while some process needs more than it
holds, nobody keeps more than its fair share. The limiter runs on the slots granted, so
a request never waits on Redis.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guardrails.budget import ConnectionBudget
from guardrails.coordination.lua import Keys, Scripts, text

if TYPE_CHECKING:
    from guardrails.limiter import ConcurrencyLimiter

__all__ = ["MIN_GAP", "Grant", "Lease", "shares"]

MIN_GAP = 0.1
"""Least time between two lease calls of one process, however starved it is."""


def shares(
    budget: int | ConnectionBudget | None,
    guard_budget: ConnectionBudget | None,
    per_process: int | None,
    batch: int | None,
    limit: int,
) -> tuple[int, int, int]:
    """``(budget, per_process, batch)`` for a guard whose limiter allows ``limit`` slots.

    Each comes from the coordinator's settings if given, else from the guard's
    ``ConnectionBudget``, else from ``limit``; ``ValueError`` when no budget is known.
    """
    given = budget
    if given is None:
        if guard_budget is None:
            raise ValueError(
                "RedisCoordinator needs the global budget: RedisCoordinator(url, "
                "budget=N) or Guardrails(budget=ConnectionBudget(...))"
            )
        given = guard_budget
    fallback: int | None
    if isinstance(given, ConnectionBudget):
        total = given.app_total
        fallback = given.per_process
    else:
        total = given
        fallback = guard_budget.per_process if guard_budget is not None else None
    if per_process is not None:
        fallback = per_process
    if fallback is None:
        fallback = limit
    return total, max(1, min(fallback, limit)), batch or max(1, math.ceil(limit / 4))


@dataclass(frozen=True, slots=True)
class Grant:
    """Redis's answer to one renewal, and what was asked."""

    sent: float
    """Monotonic time the renewal was sent: the lease runs from then."""
    want: int
    grant: int
    """Slots this process may use now."""
    record: int
    """Slots Redis has on record for this process (at least those in use)."""
    active: int
    """Processes that needed slots lately, this one included."""
    fair: int
    contended: bool
    """Some other process needs more than it holds."""
    breaker_ms: int
    """Milliseconds left of the shared breaker's open period, -1 when none is on record."""
    opening: str
    """The shared breaker key's value ("" when none)."""


class Lease:
    """This process's lease on the shared budget: what it holds, asks for, and until when."""

    __slots__ = (
        "contended",
        "fair",
        "held",
        "keys",
        "last_call",
        "next_call",
        "peak",
        "process_id",
        "processes",
        "ttl",
        "until",
        "want",
    )

    def __init__(self, process_id: str, keys: Keys, ttl: float) -> None:
        self.process_id = process_id
        self.keys = keys
        self.ttl = ttl
        """Seconds a lease lasts unless renewed."""
        self.held = 0
        """Slots Redis has on record for us."""
        self.want = 0
        self.peak = 0
        """Most slots in use or waited for since the last renewal."""
        self.processes = 0
        self.fair = 0
        self.contended = False
        self.until = 0.0
        """Monotonic time our lease on record runs out."""
        self.next_call = 0.0
        """Monotonic time of the next regular renewal."""
        self.last_call = -math.inf

    def note_demand(self, limiter: ConcurrencyLimiter) -> None:
        """Remember the demand now (in use plus waiting) for the next renewal."""
        demand = limiter.in_flight + limiter.queued
        if demand > self.peak:
            self.peak = demand

    def due(self, now: float, limiter: ConcurrencyLimiter, timeout: float) -> bool:
        """Is a renewal due: on schedule, for a starving queue, or before the lease ends?"""
        starving = limiter.queued > 0 and self.held < limiter.configured_limit
        return (
            now >= self.next_call
            or (starving and now - self.last_call >= MIN_GAP)
            or now >= self.until - timeout
        )

    async def renew(
        self,
        scripts: Scripts,
        limiter: ConcurrencyLimiter,
        *,
        connected: bool,
        budget: int,
        batch: int,
    ) -> Grant:
        """Ask Redis for slots; the local limit shrinks first if we hold more than we keep."""
        sent = time.monotonic()
        leased = connected or sent < self.until
        need = min(limiter.configured_limit, self.peak)
        want = min(limiter.configured_limit, need + batch)
        if leased:
            # Keep on record only the work running now and, under overload, what we may
            # keep: all we need, or no more than the fair share while others wait.
            keep = min(need, self.fair) if self.contended else need
            floor = min(self.held, max(limiter.in_flight, keep))
            # Shrink locally before asking, so that whatever Redis answers, our use stays
            # within what it has on record for us (arrivals meanwhile wait one round trip).
            if floor < limiter.limit:
                limiter.set_limit(floor)
        else:
            # No lease of ours in Redis (starting, or local since it expired): record the
            # work running now; the local cap stays until Redis answers, as an attempt
            # that fails must not cut the local capacity.
            floor = limiter.in_flight
        result = await scripts.run(
            "lease",
            self.keys.for_lease,
            [self.process_id, want, need, floor, budget, int(self.ttl * 1000)],
        )
        grant, record, active, fair, contended, remaining = (int(v) for v in result[:6])
        return Grant(
            sent, want, grant, record, active, fair, bool(contended), remaining, text(result[6])
        )

    def take(self, grant: Grant) -> None:
        """Hold what Redis granted, and plan the next renewal."""
        self.held = grant.record
        self.want = grant.want
        self.peak = 0
        self.processes = grant.active
        self.fair = grant.fair
        self.contended = grant.contended
        self.until = grant.sent + self.ttl
        self.last_call = grant.sent
        # Held above the fair share while others wait: come back soon to give it up.
        soon = self.contended and grant.record > grant.fair
        self.next_call = grant.sent + (MIN_GAP if soon else self.ttl / 3)

    def fall_back(self, limiter: ConcurrencyLimiter, per_process: int) -> None:
        """Redis lost: stay within our lease while Redis still counts it, then ``per_process``."""
        # While our lease stands the others hold the rest of the budget: more would overrun it.
        limit = min(limiter.limit, self.held) if time.monotonic() < self.until else per_process
        if limiter.limit != limit:
            limiter.set_limit(limit)

    async def give_back(self, scripts: Scripts, in_flight: int, budget: int) -> None:
        """Keep on record only the slots in use, for a moment: shutting down."""
        await scripts.run(
            "lease", self.keys.for_lease, [self.process_id, 0, 0, in_flight, budget, 1]
        )
