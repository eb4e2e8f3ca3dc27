"""Admission control: a fixed number of slots, priority lanes, a bounded FIFO queue, deadlines.

Knows nothing of HTTP. A caller asks for a slot, gets a :class:`Permit` or a
:class:`~guardrails.errors.Shed`, and gives the slot back with ``Permit.release()``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from enum import Enum
from typing import Any

import anyio

from guardrails.errors import Shed

__all__ = ["ConcurrencyLimiter", "Permit", "Priority"]


class Priority(str, Enum):
    """Admission lane of a request; the value is the string users write in a policy."""

    CRITICAL = "critical"
    """May use every slot and is served before anything else in the queue."""
    NORMAL = "normal"
    """Leaves ``reserve_critical`` slots free for critical work."""
    LOW = "low"
    """Admitted only below the low watermark; the first to be shed."""


_LANES = (Priority.CRITICAL, Priority.NORMAL, Priority.LOW)


def _default_reserve(limit: int) -> int:
    return max(1, limit // 10) if limit >= 4 else 0


def seconds(value: float | timedelta, name: str) -> float:
    """Convert a duration given as seconds or ``timedelta`` to seconds, rejecting negatives."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or a timedelta, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


class _Waiter:
    """One caller waiting for a slot; lives in exactly one lane queue while ``queued``."""

    __slots__ = ("event", "evicted", "granted", "lane", "queued")

    def __init__(self, lane: Priority) -> None:
        self.lane = lane
        self.event = anyio.Event()
        self.granted = False
        self.evicted = False
        self.queued = True


class _Gate:
    """Slots with per-lane caps and FIFO lane queues; the unit both the limiter and a
    bulkhead are made of.

    Caps are nested (low <= normal <= critical) so the head of the most important
    non-empty lane decides alone whether anyone can be granted: O(1) per grant.
    """

    __slots__ = ("caps", "in_flight", "limit", "max_queue", "name", "queues", "waiting")

    def __init__(self, name: str, limit: int, caps: dict[Priority, int], max_queue: int) -> None:
        self.name = name
        self.limit = limit
        self.caps = caps
        self.max_queue = max_queue
        self.in_flight = 0
        self.waiting = 0
        # OrderedDict gives O(1) removal of a waiter that times out mid-queue.
        self.queues: dict[Priority, OrderedDict[_Waiter, None]] = {
            lane: OrderedDict() for lane in _LANES
        }

    def try_take(self, lane: Priority) -> bool:
        """Take a slot without waiting, unless someone of this lane or above is queued."""
        if self.in_flight >= self.caps[lane]:
            return False
        if self.waiting:
            for other in _LANES:
                if self.queues[other]:
                    return False
                if other is lane:
                    break
        self.in_flight += 1
        return True

    def enqueue(self, lane: Priority) -> _Waiter | None:
        """Queue a waiter; ``None`` when the queue is full and nobody could be evicted."""
        if self.waiting >= self.max_queue and not (lane is not Priority.LOW and self._evict_low()):
            return None
        waiter = _Waiter(lane)
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

    def forget(self, waiter: _Waiter) -> None:
        if waiter.queued:
            waiter.queued = False
            del self.queues[waiter.lane][waiter]
            self.waiting -= 1

    def release(self) -> None:
        self.in_flight -= 1
        if self.waiting:
            self._grant()

    def _grant(self) -> None:
        while self.waiting:
            for lane in _LANES:
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

    def snapshot(self) -> dict[str, Any]:
        return {"limit": self.limit, "in_flight": self.in_flight, "queued": self.waiting}


class Permit:
    """A granted slot. ``release()`` gives it back; calling it again does nothing."""

    __slots__ = ("_bulkhead", "_gate", "_released", "priority", "waited")

    def __init__(
        self, gate: _Gate, bulkhead: _Gate | None, priority: Priority, waited: bool
    ) -> None:
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


class ConcurrencyLimiter:
    """Caps concurrent work at ``limit`` slots, queues briefly, and sheds the excess fast.

    - ``max_queue`` callers may wait; beyond that a caller is shed at once
      (a waiting ``low`` caller is evicted first to make room for more important work).
    - A waiter gives up after ``queue_timeout`` or at its own deadline, whichever is first.
    - ``critical`` may use every slot and is served first; ``normal`` leaves
      ``reserve_critical`` slots free; ``low`` is admitted only while fewer than
      ``low_watermark`` x ``limit`` slots are busy.
    - Bulkheads (:meth:`bulkhead`) cap one kind of work inside the global limit.

    Accounting is exact under cancellation: a waiter cancelled at the moment it is
    granted gives its slot back. Not thread-safe: use it from one event loop.
    """

    def __init__(
        self,
        limit: int,
        *,
        max_queue: int = 64,
        queue_timeout: float | timedelta = 1.0,
        reserve_critical: int | None = None,
        low_watermark: float = 0.75,
    ) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(
                f"limit must be a whole number of slots >= 1, not {limit!r}: set it to the "
                "connection budget per process (ConnectionBudget.per_process)"
            )
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(
                f"max_queue must be a whole number >= 0, not {max_queue!r} "
                "(0 means: shed at once when every slot is busy)"
            )
        reserve_critical_given = reserve_critical is not None
        if reserve_critical is None:
            reserve_critical = _default_reserve(limit)
        if (
            isinstance(reserve_critical, bool)
            or not isinstance(reserve_critical, int)
            or not 0 <= reserve_critical < limit
        ):
            raise ValueError(
                f"reserve_critical must be a whole number from 0 to limit - 1 ({limit - 1}), "
                f"not {reserve_critical!r}: it is how many slots normal work leaves for "
                "critical work"
            )
        if not isinstance(low_watermark, int | float) or not 0 < low_watermark <= 1:
            raise ValueError(
                f"low_watermark must be a fraction in (0, 1], not {low_watermark!r}: low "
                "priority work is admitted only while utilisation is below it"
            )
        self.limit = limit
        self.configured_limit = limit
        """The ``limit`` given at construction; :meth:`set_limit` never goes above it."""
        self.max_queue = max_queue
        self.queue_timeout = seconds(queue_timeout, "queue_timeout")
        self.reserve_critical = reserve_critical
        self._reserve_given = reserve_critical_given
        self.low_watermark = float(low_watermark)
        self._gate = _Gate("global", limit, self._caps(limit), max_queue)
        self._bulkheads: dict[str, _Gate] = {}
        self.retry_after = max(1, math.ceil(self.queue_timeout))
        """Seconds a shed caller is told to wait before trying again."""
        self.admitted_total = 0
        self.queued_total = 0
        self.shed_by_reason: dict[str, int] = {}

    def _caps(self, limit: int) -> dict[Priority, int]:
        reserve = self.reserve_critical if self._reserve_given else _default_reserve(limit)
        reserve = min(reserve, max(0, limit - 1))
        normal_cap = limit - reserve
        low_cap = min(normal_cap, max(1, math.floor(limit * self.low_watermark))) if limit else 0
        return {Priority.CRITICAL: limit, Priority.NORMAL: normal_cap, Priority.LOW: low_cap}

    def set_limit(self, limit: int) -> None:
        """Change the number of slots at run time, between 0 and ``configured_limit``.

        For coordinators that lease slots from a global budget. Lowering it lets the
        work in flight finish and admits nobody new until it is below the new limit;
        raising it admits waiters at once.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a whole number >= 0, not {limit!r}")
        limit = min(limit, self.configured_limit)
        if limit == self.limit:
            return
        self.limit = limit
        gate = self._gate
        gate.limit = limit
        gate.caps = self._caps(limit)
        if gate.waiting:
            gate._grant()

    @property
    def in_flight(self) -> int:
        """Slots in use now."""
        return self._gate.in_flight

    @property
    def queued(self) -> int:
        """Callers waiting now, in the global queue and in bulkhead queues."""
        return self._gate.waiting + sum(g.waiting for g in self._bulkheads.values())

    @property
    def shed_total(self) -> int:
        """Callers refused admission since the limiter was made."""
        return sum(self.shed_by_reason.values())

    def bulkhead(self, name: str, max_concurrency: int) -> str:
        """Declare a sub-limit of ``max_concurrency`` slots for work named ``name``.

        Work in a bulkhead holds a bulkhead slot and a global slot, so it counts
        inside the global limit. Returns ``name``, to pass to :meth:`acquire`.
        """
        if (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or max_concurrency < 1
        ):
            raise ValueError(
                f"max_concurrency of {name!r} must be a whole number >= 1, not {max_concurrency!r}"
            )
        existing = self._bulkheads.get(name)
        if existing is not None:
            if existing.limit != max_concurrency:
                raise ValueError(
                    f"bulkhead {name!r} already exists with max_concurrency "
                    f"{existing.limit}; give the new one another name"
                )
            return name
        caps = dict.fromkeys(_LANES, max_concurrency)
        self._bulkheads[name] = _Gate(name, max_concurrency, caps, self.max_queue)
        return name

    def try_take(self, priority: Priority) -> bool:
        """Take a slot outside any bulkhead if one is free now; give it back with :meth:`give_back`.

        The allocation-free form of :meth:`try_acquire` for callers that track the slot
        themselves (the middleware does, on an object it has anyway).
        """
        gate = self._gate
        # _Gate.try_take inlined for the common case, a free slot and nobody queued: this
        # runs once per admitted request.
        if gate.waiting or gate.in_flight >= gate.caps[priority]:
            if not gate.try_take(priority):
                return False
        else:
            gate.in_flight += 1
        self.admitted_total += 1
        return True

    def give_back(self) -> None:
        """Return a slot taken with :meth:`try_take` (exactly once per slot)."""
        gate = self._gate
        gate.in_flight -= 1
        if gate.waiting:
            gate._grant()

    def try_acquire(
        self, priority: Priority = Priority.NORMAL, *, bulkhead: str | None = None
    ) -> Permit | None:
        """Take a slot if one is free for this lane right now, without waiting."""
        gate = self._gate
        if bulkhead is None:
            # The hot path: no clock read, no allocation beyond the permit.
            if gate.try_take(priority):
                self.admitted_total += 1
                return Permit(gate, None, priority, False)
            return None
        sub = self._bulkheads[bulkhead]
        if sub.try_take(priority):
            if gate.try_take(priority):
                self.admitted_total += 1
                return Permit(gate, sub, priority, False)
            sub.release()
        return None

    async def acquire(
        self,
        priority: Priority = Priority.NORMAL,
        *,
        deadline: float | None = None,
        bulkhead: str | None = None,
    ) -> Permit:
        """Wait for a slot and return its :class:`Permit`, or raise :class:`Shed`.

        ``deadline`` is an absolute time on ``anyio.current_time()``'s clock past
        which the caller must not wait, whatever ``queue_timeout`` says.
        """
        permit = self.try_acquire(priority, bulkhead=bulkhead)
        if permit is not None:
            return permit
        gate = self._gate
        sub = self._bulkheads[bulkhead] if bulkhead is not None else None
        holds_sub = False
        until, reason = self._wait_until(deadline)
        try:
            if sub is not None:
                if not sub.try_take(priority):
                    await self._wait(sub, priority, until, reason)
                holds_sub = True
            if not gate.try_take(priority):
                await self._wait(gate, priority, until, reason)
        except BaseException:
            if sub is not None and holds_sub:
                sub.release()
            raise
        self.admitted_total += 1
        self.queued_total += 1
        return Permit(gate, sub, priority, True)

    @asynccontextmanager
    async def slot(
        self,
        priority: Priority = Priority.NORMAL,
        *,
        deadline: float | None = None,
        bulkhead: str | None = None,
    ) -> AsyncIterator[Permit]:
        """Hold a slot for the duration of an ``async with`` block."""
        permit = await self.acquire(priority, deadline=deadline, bulkhead=bulkhead)
        try:
            yield permit
        finally:
            permit.release()

    def snapshot(self) -> dict[str, Any]:
        """Occupancy and counters as plain data."""
        gate = self._gate
        return {
            "limit": self.limit,
            "in_flight": gate.in_flight,
            "queued": self.queued,
            "max_queue": self.max_queue,
            "queue_timeout": self.queue_timeout,
            "utilization": gate.in_flight / self.limit if self.limit else 1.0,
            "configured_limit": self.configured_limit,
            "lanes": {lane.value: cap for lane, cap in gate.caps.items()},
            "admitted_total": self.admitted_total,
            "queued_total": self.queued_total,
            "shed_total": self.shed_total,
            "shed_by_reason": dict(self.shed_by_reason),
            "bulkheads": {name: b.snapshot() for name, b in self._bulkheads.items()},
        }

    # -- internals -------------------------------------------------------------

    def _wait_until(self, deadline: float | None) -> tuple[float, str]:
        until = anyio.current_time() + self.queue_timeout
        if deadline is not None and deadline < until:
            return deadline, "deadline"
        return until, "queue_timeout"

    def _shed(self, reason: str) -> Shed:
        self.shed_by_reason[reason] = self.shed_by_reason.get(reason, 0) + 1
        return Shed(reason, retry_after=self.retry_after)

    async def _wait(self, gate: _Gate, lane: Priority, until: float, reason: str) -> None:
        remaining = until - anyio.current_time()
        if remaining <= 0:
            raise self._shed(reason)
        waiter = gate.enqueue(lane)
        if waiter is None:
            raise self._shed("queue_full")
        try:
            with anyio.move_on_after(remaining):
                await waiter.event.wait()
        except BaseException:
            # Cancelled from outside: if the slot was granted meanwhile, give it back.
            if waiter.granted:
                gate.release()
            else:
                gate.forget(waiter)
            raise
        if waiter.granted:
            # Granted, even if the timeout fired in the same instant: the slot is ours.
            return
        gate.forget(waiter)
        raise self._shed("evicted" if waiter.evicted else reason)
