"""The unit a limiter and each of its bulkheads are made of: slots, priority lanes with
FIFO queues, what the queue learns about how fast slots turn over, and the permit that
gives a slot back.

:class:`~guardrails.limiter.ConcurrencyLimiter` is the public face; ``Priority`` and
``Permit`` are public through it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from typing import Any

import anyio

__all__ = ["LANES", "Gate", "Permit", "Priority", "Waiter"]


class Priority(str, Enum):
    """Admission lane of a request; the value is the string users write in a policy."""

    CRITICAL = "critical"
    """Served before anything else queued: takes the next free slot."""
    NORMAL = "normal"
    """May use every slot (unless ``reserve_critical`` keeps some back); served in order."""
    LOW = "low"
    """Admitted only below the low watermark; the first to be shed."""


LANES = (Priority.CRITICAL, Priority.NORMAL, Priority.LOW)
"""The lanes, most important first: a lane is served only when the ones before it are empty."""

_SAMPLES = 32
"""The hold estimate is the mean of its first samples, then an average that gives each new
sample 1/32 of the weight: about six holds' worth of hand-offs on five slots."""


class Waiter:
    """One caller waiting for a slot; lives in exactly one lane queue while ``queued``."""

    __slots__ = ("event", "evicted", "granted", "lane", "queued")

    def __init__(self, lane: Priority) -> None:
        self.lane = lane
        self.event = anyio.Event()
        self.granted = False
        self.evicted = False
        self.queued = True


class Gate:
    """Slots with per-lane caps and FIFO lane queues.

    Caps are nested (low <= normal <= critical) so the head of the most important
    non-empty lane decides alone whether anyone can be granted: O(1) per grant.

    While someone waits, every slot its lane may use is busy, so each release is a
    hand-off, and ``busy x (time since the previous hand-off)`` is one sample of how
    long a slot is held (Little's law over that interval). ``hold`` averages those
    samples; it is ``None`` until two hand-offs with no other release between them
    have been seen (a release that finds nobody waiting may leave a slot idle).
    ``busy_since`` is when the queue started to stay busy: an empty spell shorter
    than one hold does not end a busy period (under overload a short queue empties
    for a moment at a hand-off and refills at the next arrival). The clock is read
    only on these slow paths, never when a free slot is taken or given back.
    """

    __slots__ = (
        "busy_since",
        "caps",
        "clock",
        "delaying",
        "emptied_at",
        "hold",
        "in_flight",
        "last_handoff",
        "limit",
        "max_queue",
        "name",
        "queues",
        "room",
        "samples",
        "waiting",
    )

    def __init__(
        self,
        name: str,
        limit: int,
        caps: dict[Priority, int],
        max_queue: int,
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.limit = limit
        self.caps = caps
        self.max_queue = max_queue
        self.room = max_queue + limit
        """Queue places critical work may use: one per slot beyond ``max_queue``."""
        self.clock = clock
        self.in_flight = 0
        self.waiting = 0
        # OrderedDict gives O(1) removal of a waiter that times out mid-queue.
        self.queues: dict[Priority, OrderedDict[Waiter, None]] = {
            lane: OrderedDict() for lane in LANES
        }
        self.hold: float | None = None
        self.samples = 0
        self.last_handoff: float | None = None
        self.busy_since: float | None = None
        self.emptied_at: float | None = None
        self.delaying = False
        """Whether controlled delay is on (the limiter switches it)."""

    def try_take(self, lane: Priority) -> bool:
        """Take a slot without waiting, unless someone of this lane or above is queued."""
        if self.in_flight >= self.caps[lane]:
            return False
        if self.waiting:
            for other in LANES:
                if self.queues[other]:
                    return False
                if other is lane:
                    break
        self.in_flight += 1
        return True

    def ahead(self, lane: Priority) -> int:
        """Waiters a newcomer of ``lane`` would be served after."""
        queues = self.queues
        if lane is Priority.CRITICAL:
            return len(queues[Priority.CRITICAL])
        ahead = len(queues[Priority.CRITICAL]) + len(queues[Priority.NORMAL])
        return ahead if lane is Priority.NORMAL else ahead + len(queues[Priority.LOW])

    def enqueue(self, lane: Priority, now: float) -> Waiter | None:
        """Queue a waiter; ``None`` when the queue is full and nobody could be evicted.

        ``max_queue`` bounds the queue for normal and low work. Critical work evicts a
        low waiter if the queue is full, and may otherwise go ``limit`` places beyond
        it: with no slot reserved, it would else be shed behind a full queue.
        """
        was_empty = not self.waiting
        if (
            self.waiting >= self.max_queue
            and not (lane is not Priority.LOW and self._evict_low())
            and not (lane is Priority.CRITICAL and self.waiting < self.room)
        ):
            return None
        if was_empty:
            if self.busy_since is None or self.drained(now):
                self.busy_since = now
            self.emptied_at = None
        waiter = Waiter(lane)
        self.queues[lane][waiter] = None
        self.waiting += 1
        return waiter

    def _evict_low(self) -> bool:
        low = self.queues[Priority.LOW]
        if not low:
            return False
        # The newest low waiter has the least sunk wait; the older ones keep their turn.
        waiter, _ = low.popitem(last=True)
        waiter.queued = False
        waiter.evicted = True
        self.waiting -= 1
        waiter.event.set()
        return True

    def forget(self, waiter: Waiter) -> None:
        """Take a waiter that gave up out of its queue (nothing if it already left)."""
        if waiter.queued:
            waiter.queued = False
            del self.queues[waiter.lane][waiter]
            self.waiting -= 1
            if not self.waiting:
                self._emptied()

    def release(self) -> None:
        """Give a slot back, handing it to the next waiter if there is one."""
        self.in_flight -= 1
        if self.waiting:
            self.handoff()
        else:
            self.last_handoff = None  # a slot may idle: the next hand-off measures afresh

    def handoff(self) -> None:
        """Learn from a release while someone waits, then grant (``in_flight`` already lowered)."""
        now = self.clock()
        last = self.last_handoff
        self.last_handoff = now
        if last is not None:
            sample = (now - last) * (self.in_flight + 1)
            hold = self.hold
            if hold is None:
                self.hold = sample
                self.samples = 1
            else:
                if self.samples < _SAMPLES:
                    self.samples += 1
                self.hold = hold + (sample - hold) / self.samples
        self.grant()

    def grant(self) -> None:
        """Admit waiters, most important lane first, while their lane's cap allows."""
        while self.waiting:
            for lane in LANES:
                queue = self.queues[lane]
                if queue:
                    break
            if self.in_flight >= self.caps[lane]:
                return
            waiter, _ = queue.popitem(last=False)
            waiter.queued = False
            waiter.granted = True
            self.waiting -= 1
            self.in_flight += 1
            waiter.event.set()
        self._emptied()

    def _emptied(self) -> None:
        self.emptied_at = self.clock()

    def drained(self, now: float) -> bool:
        """Whether the queue has been empty for a hold's time (any time, if none is known)."""
        emptied = self.emptied_at
        return emptied is not None and (self.hold is None or now - emptied >= self.hold)

    def busy_for(self, now: float) -> float:
        """Seconds the queue has stayed busy; 0 once it has drained."""
        since = self.busy_since
        if since is None or (not self.waiting and self.drained(now)):
            return 0.0
        return now - since

    def empty_for(self, now: float) -> float:
        """Seconds the queue has been empty; 0 while someone waits."""
        emptied = self.emptied_at
        if self.waiting or emptied is None:
            return 0.0 if self.waiting or self.busy_since is not None else math.inf
        return now - emptied

    def end_busy_period(self) -> None:
        """Forget the current busy period: the next waiter starts a new one."""
        self.busy_since = None

    def snapshot(self) -> dict[str, Any]:
        """Occupancy as plain data (a bulkhead's entry in the limiter's snapshot)."""
        return {"limit": self.limit, "in_flight": self.in_flight, "queued": self.waiting}


class Permit:
    """A granted slot. ``release()`` gives it back; calling it again does nothing."""

    __slots__ = ("_bulkhead", "_gate", "_released", "priority", "waited")

    def __init__(self, gate: Gate, bulkhead: Gate | None, priority: Priority, waited: bool) -> None:
        self._gate = gate
        self._bulkhead = bulkhead
        self._released = False
        self.priority = priority
        self.waited = waited
        """True when the caller queued before it was admitted."""

    @property
    def released(self) -> bool:
        """Whether the slot has been given back."""
        return self._released

    def release(self) -> None:
        """Give the slot back (idempotent, so every exit path may call it)."""
        if self._released:
            return
        self._released = True
        self._gate.release()
        if self._bulkhead is not None:
            self._bulkhead.release()
