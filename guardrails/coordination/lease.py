"""Slot leases: what a process asks Redis for, and how many slots it may use meanwhile.

Redis keeps one lease per process (``scripts/lease.lua``): the slots it holds on record,
what it needed lately, and when the lease expires unless renewed. A process asks for
what it used lately plus ``batch`` spare slots; while some process needs more than it
holds, nobody keeps more than its fair share. The limiter runs on the slots granted, so
a request never waits on Redis.

The rule that keeps the fleet inside the budget: a process never uses more than Redis
has on record for it, or, while Redis cannot be asked, more than it had on record.
When Redis forgets the records (a new generation), it grants nobody more than it
already uses until every process has told it again.
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
    settling_ms: int
    """Milliseconds left of a new generation's settling (0: none): no new slots meanwhile."""
    generation: str
    """Which server keeps the records, and since when: changes when Redis forgot them."""


class Lease:
    """This process's lease on the shared budget: what it holds, asks for, and until when."""

    __slots__ = (
        "contended",
        "ever_leased",
        "fair",
        "generation",
        "held",
        "keys",
        "last_call",
        "next_call",
        "peak",
        "process_id",
        "processes",
        "publish",
        "sent_floor",
        "settled_at",
        "ttl",
        "until",
        "want",
    )

    def __init__(
        self, process_id: str, keys: Keys, ttl: float, *, publish: str = "PUBLISH"
    ) -> None:
        self.process_id = process_id
        self.keys = keys
        self.publish = publish
        """The command requests for slots go out with: ``SPUBLISH`` on a Redis Cluster."""
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
        self.settled_at = 0.0
        """Monotonic time the settling of a new generation ends (no new slots before)."""
        self.generation = ""
        """The generation of the records our lease is in ("" before the first)."""
        self.ever_leased = False
        """Redis has granted us a lease at least once: :attr:`held` is our last share."""
        self.sent_floor: int | None = None
        """The least the renewal under way may leave on record for us (None: no lease)."""

    def settling(self, now: float) -> float | None:
        """Seconds left of a new generation's settling, as last told; None when settled.

        Settled means the last answer came after the settling (0.0: it is over, and the
        next renewal may be granted new slots).
        """
        if self.settled_at <= self.last_call:
            return None
        return max(0.0, self.settled_at - now)

    def note_demand(self, limiter: ConcurrencyLimiter) -> None:
        """Remember the demand now (in use plus waiting) for the next renewal."""
        demand = limiter.in_flight + limiter.queued
        if demand > self.peak:
            self.peak = demand

    def due(self, now: float, limiter: ConcurrencyLimiter, timeout: float) -> bool:
        """Is a renewal due: on schedule, for a starving queue, or before the lease ends?"""
        # While a new generation settles nothing new is granted: asking sooner is no use.
        starving = limiter.queued > 0 and self.held < limiter.wanted and now >= self.settled_at
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
        # An adaptive limit below the configured one is all this process would use.
        need = min(limiter.wanted, self.peak)
        want = min(limiter.configured_limit, need + batch)
        if leased:
            # Keep on record the work running now and what we may keep: while others wait,
            # no more than we need and our fair share; else what we ask for anyway (need
            # and spare slots), so that a lost answer costs no slot we still hold.
            keep = min(need, self.fair) if self.contended else want
            floor = min(self.held, max(limiter.in_flight, keep))
            # Shrink locally before asking, so that whatever Redis answers, our use stays
            # within what it has on record for us (arrivals meanwhile wait one round trip).
            if floor < limiter.cap:
                limiter.set_limit(floor)
            self.sent_floor = floor
        else:
            # No lease of ours in Redis (starting, or local since it expired): record the
            # work running now; the local cap stays until Redis answers, as an attempt
            # that fails must not cut the local capacity.
            floor = limiter.in_flight
            self.sent_floor = None
        ttl_ms = int(self.ttl * 1000)
        # A Redis that forgot the records keeps us to what we may use now: the claim.
        claim = limiter.cap
        result = await scripts.run(
            "lease",
            self.keys.for_lease,
            [self.process_id, want, need, floor, budget, ttl_ms, claim, ttl_ms, self.publish],
        )
        self.sent_floor = None
        grant, record, active, fair, contended, remaining = (int(v) for v in result[:6])
        return Grant(
            sent,
            want,
            grant,
            record,
            active,
            fair,
            bool(contended),
            remaining,
            text(result[6]),
            int(result[7]),
            text(result[8]),
        )

    def failed(self) -> None:
        """A renewal got no answer: it may have lowered our record to what it sent, no more."""
        if self.sent_floor is not None:
            self.held = min(self.held, self.sent_floor)
            self.sent_floor = None

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
        self.ever_leased = True
        self.generation = grant.generation
        # Held above the fair share while others wait: come back soon to give it up.
        soon = self.contended and grant.record > grant.fair
        self.next_call = grant.sent + (MIN_GAP if soon else self.ttl / 3)
        self.settled_at = grant.sent + grant.settling_ms / 1000
        if grant.settling_ms:
            # Ask again as the settling ends, when slots may be granted again.
            self.next_call = min(self.next_call, max(grant.sent + MIN_GAP, self.settled_at))

    def asked(self, fair: int) -> None:
        """Another process is short of slots: renew now, keeping no more than ``fair``.

        The renewal gives back what we hold beyond our need and fair share, rather than
        at the next scheduled renewal, a third of a lease later.
        """
        self.contended = True
        self.fair = min(self.fair, fair) if self.fair else fair
        self.next_call = 0.0

    def fall_back(self, limiter: ConcurrencyLimiter, per_process: int) -> None:
        """Redis lost: stay within our lease, and later within both it and ``per_process``.

        While our lease stands the others hold the rest of the budget. Once it has run out
        nobody can hand out slots, so each process keeps at most its last share and at
        most ``per_process``: the fleet stays inside the budget however the outage ends.
        A process that never had a lease trusts the budget arithmetic: ``per_process``.
        """
        if time.monotonic() < self.until:
            limit = min(limiter.cap, self.held)
        elif self.ever_leased:
            limit = min(self.held, per_process)
        else:
            limit = per_process
        if limiter.cap != limit:
            limiter.set_limit(limit)

    async def give_back(self, scripts: Scripts, in_flight: int, budget: int) -> None:
        """Keep on record only the slots in use, for a moment: shutting down."""
        ttl_ms = int(self.ttl * 1000)
        await scripts.run(
            "lease",
            self.keys.for_lease,
            [self.process_id, 0, 0, in_flight, budget, ttl_ms, in_flight, 1, self.publish],
        )
