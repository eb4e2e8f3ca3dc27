"""Admission control: slots, work-conserving priority lanes, a queue that absorbs bursts
but sheds at once what it could not serve in time, and controlled delay under overload.

Knows nothing of HTTP. A caller asks for a slot, gets a :class:`Permit` or a
:class:`~guardrails.errors.Shed`, and gives the slot back with ``Permit.release()``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel

from guardrails.adaptive import AdaptiveController, AdaptiveLimit
from guardrails.errors import Shed
from guardrails.gate import LANES, Gate, Permit, Priority
from guardrails.limiter_checks import check_arguments, seconds

__all__ = ["ConcurrencyLimiter", "Permit", "Priority"]


class ConcurrencyLimiter:
    """Caps concurrent work at ``limit`` slots, queues briefly, and sheds the excess fast.

    - Lanes are work-conserving: ``normal`` work may use every slot while nothing more
      important waits; ``critical`` work is served first, taking the next free slot
      (``reserve_critical=N`` keeps N slots idle for it instead, at a cost in
      throughput); ``low`` work is admitted only while fewer than ``low_watermark`` x
      ``limit`` slots are busy, and is the first to be shed.
    - ``max_queue`` callers may wait; beyond that a caller is shed at once (a waiting
      ``low`` caller is evicted first to make room for more important work, and
      ``critical`` work may go ``limit`` places beyond ``max_queue``).
    - A waiter gives up after ``queue_timeout`` or at its own deadline, whichever is
      first; a caller whose expected wait, (waiters ahead + 1) x hold / slots, is
      longer than that is shed at once. The hold time is learnt from hand-offs; while
      none has been seen, nobody is shed on a guess.
    - Controlled delay: once the queue has stayed busy for ``delay_interval`` (an
      empty spell shorter than one hold does not count), a newcomer joins the queue
      only if its expected wait is at most
      ``max(delay_target, delay_target_holds x hold)``, until the queue has been
      empty for half the interval. Sustained overload keeps a short queue, while a
      burst that drains within the interval is absorbed whole. The head of the
      queue and critical work are exempt.
    - Bulkheads (:meth:`bulkhead`) cap one kind of work inside the global limit.
    - ``adaptive`` (an :class:`~guardrails.adaptive.AdaptiveLimit`) lowers the number
      of slots below ``limit`` while slots are held longer than usual, and raises it
      back; ``limit`` stays the ceiling. Callers report completed holds with
      :meth:`completed`.

    Accounting is exact under cancellation: a waiter cancelled at the moment it is
    granted gives its slot back. Not thread-safe: use it from one event loop.
    ``clock`` is the clock deadlines are given on (``anyio.current_time`` by default).
    """

    def __init__(
        self,
        limit: int,
        *,
        max_queue: int = 64,
        queue_timeout: float | timedelta = 1.0,
        reserve_critical: int | None = None,
        low_watermark: float = 0.75,
        delay_interval: float | timedelta | None = 1.5,
        delay_target: float | timedelta = 0.005,
        delay_target_holds: float = 0.25,
        clock: Callable[[], float] | None = None,
        adaptive: AdaptiveLimit | None = None,
    ) -> None:
        reserve_critical = check_arguments(
            limit, max_queue, reserve_critical, low_watermark, delay_target_holds, clock, adaptive
        )
        self.limit = limit
        """Slots in use may reach this now: the least of the cap and the adaptive limit."""
        self.configured_limit = limit
        """The ``limit`` given at construction; :meth:`set_limit` never goes above it."""
        self.cap = limit
        """The limit :meth:`set_limit` set last (a coordinator's lease), or the configured one."""
        self.adaptive: AdaptiveController | None = (
            None if adaptive is None else adaptive.controller(limit, clock)
        )
        """The running adaptive limit, or None when the limit is fixed."""
        self.max_queue = max_queue
        self.queue_timeout = seconds(queue_timeout, "queue_timeout")
        self.reserve_critical = reserve_critical
        self.low_watermark = float(low_watermark)
        self.delay_interval = (
            None if delay_interval is None else seconds(delay_interval, "delay_interval")
        )
        """Seconds the queue may stay non-empty before controlled delay starts; None: never."""
        self.delay_target = seconds(delay_target, "delay_target")
        self.delay_target_holds = float(delay_target_holds)
        self._clock: Callable[[], float] = clock if clock is not None else anyio.current_time
        self._gate = Gate("global", limit, self._caps(limit), max_queue, self._clock)
        self._bulkheads: dict[str, Gate] = {}
        self.retry_after = max(1, math.ceil(self.queue_timeout))
        """Seconds a shed caller is told to wait before trying again."""
        self.admitted_total = 0
        self.queued_total = 0
        self.early_shed_total = 0
        """Callers shed at once because they could not be served in time (counted in
        ``shed_by_reason`` too, as ``queue_timeout`` or ``deadline``)."""
        self.shed_by_reason: dict[str, int] = {}

    def _caps(self, limit: int) -> dict[Priority, int]:
        reserve = min(self.reserve_critical, max(0, limit - 1))
        normal_cap = limit - reserve
        low_cap = min(normal_cap, max(1, math.floor(limit * self.low_watermark))) if limit else 0
        return {Priority.CRITICAL: limit, Priority.NORMAL: normal_cap, Priority.LOW: low_cap}

    def set_limit(self, limit: int) -> None:
        """Change the number of slots at run time, between 0 and ``configured_limit``.

        For coordinators that lease slots from a global budget. Lowering it lets the
        work in flight finish and admits nobody new until it is below the new limit;
        raising it admits waiters at once. It sets :attr:`cap`; with an adaptive limit
        the slots are the lesser of the two.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a whole number >= 0, not {limit!r}")
        self.cap = min(limit, self.configured_limit)
        self._apply()

    @property
    def wanted(self) -> int:
        """Slots this process would use if it could: the adaptive limit, else the configured."""
        adaptive = self.adaptive
        return self.configured_limit if adaptive is None else adaptive.limit

    def completed(self, started: float) -> None:
        """A slot taken at ``started`` (on ``adaptive.clock``) was held by work that completed.

        Feeds the adaptive limit; call it after giving the slot back, only for work that
        succeeded (a failure or a pool timeout is not a sample). Nothing without one.
        """
        adaptive = self.adaptive
        if adaptive is not None and adaptive.sample(adaptive.clock() - started):
            self._apply()

    def tick(self) -> None:
        """Let the adaptive limit end a window that is due without a new sample."""
        adaptive = self.adaptive
        if adaptive is not None and adaptive.tick():
            self._apply()

    def _apply(self) -> None:
        adaptive = self.adaptive
        limit = self.cap if adaptive is None else min(self.cap, adaptive.limit)
        if limit == self.limit:
            return
        self.limit = limit
        gate = self._gate
        gate.limit = limit
        gate.caps = self._caps(limit)
        if gate.waiting:
            gate.grant()

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

    @property
    def hold_estimate(self) -> float | None:
        """Seconds a slot is held, as learnt from recent hand-offs; None until measured."""
        return self._gate.hold

    @property
    def controlled_delay(self) -> bool:
        """Whether the queue is under controlled delay: it stayed busy for
        ``delay_interval``, and has not been empty for half as long since."""
        gate = self._gate
        if not gate.delaying or gate.waiting:
            return gate.delaying
        try:
            now = self._clock()
        except RuntimeError:  # read off the event loop: as of the last caller that waited
            return True
        return self._delay_on(gate, now)

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
        caps = dict.fromkeys(LANES, max_concurrency)
        self._bulkheads[name] = Gate(name, max_concurrency, caps, self.max_queue, self._clock)
        return name

    def try_take(self, priority: Priority) -> bool:
        """Take a slot outside any bulkhead if one is free now; give it back with :meth:`give_back`.

        The allocation-free form of :meth:`try_acquire` for callers that track the slot
        themselves (the middleware does, on an object it has anyway).
        """
        gate = self._gate
        # Gate.try_take inlined for the common case, a free slot and nobody queued: this
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
            gate.handoff()
        else:
            gate.last_handoff = None  # Gate.release inlined: one store, no call

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

        ``deadline`` is an absolute time on the limiter's clock (``anyio.current_time()``
        unless another was given) past which the caller must not wait, whatever
        ``queue_timeout`` says.
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
        """Occupancy, what the queue has learnt, and counters, as plain data."""
        gate = self._gate
        return {
            "limit": self.limit,
            "in_flight": gate.in_flight,
            "queued": self.queued,
            "max_queue": self.max_queue,
            "queue_timeout": self.queue_timeout,
            "utilization": gate.in_flight / self.limit if self.limit else 1.0,
            "configured_limit": self.configured_limit,
            "cap": self.cap,
            "adaptive": self.adaptive.snapshot() if self.adaptive is not None else None,
            "lanes": {lane.value: cap for lane, cap in gate.caps.items()},
            "hold_estimate": gate.hold,
            "controlled_delay": self.controlled_delay,
            "admitted_total": self.admitted_total,
            "queued_total": self.queued_total,
            "shed_total": self.shed_total,
            "early_shed_total": self.early_shed_total,
            "shed_by_reason": dict(self.shed_by_reason),
            "bulkheads": {name: b.snapshot() for name, b in self._bulkheads.items()},
        }

    # -- internals -------------------------------------------------------------

    def _wait_until(self, deadline: float | None) -> tuple[float, str]:
        until = self._clock() + self.queue_timeout
        if deadline is not None and deadline < until:
            return deadline, "deadline"
        return until, "queue_timeout"

    def _shed(self, reason: str) -> Shed:
        self.shed_by_reason[reason] = self.shed_by_reason.get(reason, 0) + 1
        return Shed(reason, retry_after=self.retry_after)

    def _shed_early(
        self, gate: Gate, lane: Priority, now: float, remaining: float, reason: str
    ) -> str | None:
        """The reason to shed a caller now rather than queue it, or None to queue it.

        ``reason`` when it would run out of its own time (``queue_timeout`` or
        ``deadline``); ``queue_timeout`` when controlled delay shortens the queue's.
        """
        hold = gate.hold
        slots = gate.caps[lane]
        if hold is None or slots <= 0:
            return None  # nothing measured yet: never shed on a guess
        ahead = gate.ahead(lane)
        expected = (ahead + 1) * hold / slots
        if expected > remaining:
            return reason
        if (
            self._delay_on(gate, now)
            and ahead
            and lane is not Priority.CRITICAL
            and expected > max(self.delay_target, self.delay_target_holds * hold)
        ):
            return "queue_timeout"
        return None

    def _delay_on(self, gate: Gate, now: float) -> bool:
        """Switch controlled delay on or off for ``gate`` as of ``now``; whether it is on."""
        interval = self.delay_interval
        if interval is None:
            return False
        if gate.delaying:
            # A short controlled queue runs dry for moments while the overload goes on:
            # after a stall, slots come back together and arrivals take them without
            # queueing, for about slots / (arrival rate - service rate). Starting over
            # costs a queue that grows at that same excess rate for a whole interval,
            # so a spell shorter than half the interval is not taken for the end.
            if gate.empty_for(now) >= interval / 2:
                gate.delaying = False
                gate.end_busy_period()
        elif gate.busy_for(now) >= interval:
            gate.delaying = True
        return gate.delaying

    async def _wait(self, gate: Gate, lane: Priority, until: float, reason: str) -> None:
        now = self._clock()
        remaining = until - now
        early = reason if remaining <= 0 else self._shed_early(gate, lane, now, remaining, reason)
        waiter = gate.enqueue(lane, now) if early is None else None
        if waiter is None:
            # Shed without waiting, yet a checkpoint: a caller that retries in a loop
            # must let the tasks holding the slots run.
            await anyio.lowlevel.checkpoint()
            if early is not None and remaining > 0:
                self.early_shed_total += 1
            raise self._shed("queue_full" if early is None else early)
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
