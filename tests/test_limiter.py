"""ConcurrencyLimiter on its own: slots, FIFO queue, lanes, bulkheads, timeouts, cancellation."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked
from anyio.abc import TaskGroup
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrails import ConcurrencyLimiter, Permit, Priority, Shed

pytestmark = pytest.mark.anyio


async def _acquire_into(
    limiter: ConcurrencyLimiter,
    out: list[object],
    tag: object,
    priority: Priority = Priority.NORMAL,
    **kwargs: object,
) -> None:
    try:
        permit = await limiter.acquire(priority, **kwargs)  # type: ignore[arg-type]
    except Shed as exc:
        out.append((tag, exc.reason))
    else:
        out.append((tag, permit))


def _permits(results: list[object]) -> list[Permit]:
    return [r[1] for r in results if isinstance(r, tuple) and isinstance(r[1], Permit)]


async def _spawn(
    tg: TaskGroup,
    limiter: ConcurrencyLimiter,
    out: list[object],
    *tags: object,
    priority: Priority = Priority.NORMAL,
    **kwargs: object,
) -> None:
    for tag in tags:
        tg.start_soon(lambda t=tag: _acquire_into(limiter, out, t, priority, **kwargs))
        await wait_all_tasks_blocked()


async def test_admits_up_to_the_limit_then_queues_in_fifo_order() -> None:
    limiter = ConcurrencyLimiter(2, max_queue=10, queue_timeout=5, reserve_critical=0)
    first = await limiter.acquire()
    second = await limiter.acquire()
    assert (limiter.in_flight, limiter.queued) == (2, 0)
    granted: list[object] = []
    async with anyio.create_task_group() as tg:
        await _spawn(tg, limiter, granted, "a", "b", "c")
        assert limiter.queued == 3
        first.release()
        await wait_all_tasks_blocked()
        second.release()
        await wait_all_tasks_blocked()
        assert [tag for tag, _ in granted] == ["a", "b"]  # type: ignore[misc]
        for permit in _permits(granted):
            permit.release()
    assert [tag for tag, _ in granted] == ["a", "b", "c"]  # type: ignore[misc]
    for permit in _permits(granted):
        permit.release()
    assert (limiter.in_flight, limiter.queued) == (0, 0)
    snap = limiter.snapshot()
    assert (snap["admitted_total"], snap["queued_total"], snap["shed_total"]) == (5, 3, 0)


async def test_full_queue_sheds_at_once_without_waiting() -> None:
    limiter = ConcurrencyLimiter(1, max_queue=1, queue_timeout=30)
    held = await limiter.acquire()
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        await _spawn(tg, limiter, results, "waiter")
        with anyio.fail_after(1):  # a shed must not wait for the 30 s queue timeout
            with pytest.raises(Shed) as excinfo:
                await limiter.acquire()
        assert excinfo.value.reason == "queue_full"
        assert excinfo.value.retry_after == 30
        held.release()
    for permit in _permits(results):
        permit.release()
    assert limiter.snapshot()["shed_by_reason"] == {"queue_full": 1}
    assert limiter.in_flight == 0


async def test_max_queue_zero_means_no_waiting() -> None:
    limiter = ConcurrencyLimiter(1, max_queue=0, queue_timeout=5)
    async with limiter.slot():
        with pytest.raises(Shed, match="queue_full"):
            await limiter.acquire()
    assert limiter.in_flight == 0


async def test_a_caller_shed_at_once_still_lets_other_tasks_run() -> None:
    # A caller that retries in a loop on Shed must not starve the tasks holding the
    # slots: acquire() is a checkpoint even when it sheds without waiting.
    limiter = ConcurrencyLimiter(1, max_queue=0)
    held = await limiter.acquire()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other task")

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        with pytest.raises(Shed, match="queue_full"):
            await limiter.acquire()
        assert ran == ["other task"]
    held.release()
    assert limiter.in_flight == 0


async def test_waiter_gives_up_after_queue_timeout() -> None:
    limiter = ConcurrencyLimiter(1, queue_timeout=timedelta(milliseconds=50))
    async with limiter.slot():
        with anyio.fail_after(2), pytest.raises(Shed) as excinfo:
            await limiter.acquire()
    assert excinfo.value.reason == "queue_timeout"
    assert excinfo.value.retry_after == 1  # integer, at least one second
    assert (limiter.in_flight, limiter.queued, limiter.shed_total) == (0, 0, 1)


async def test_deadline_shorter_than_queue_timeout_wins() -> None:
    limiter = ConcurrencyLimiter(1, queue_timeout=30)
    async with limiter.slot():
        started = anyio.current_time()
        with pytest.raises(Shed) as excinfo:
            await limiter.acquire(deadline=started + 0.05)
        waited = anyio.current_time() - started
        with pytest.raises(Shed) as past:
            await limiter.acquire(deadline=started - 1)
    assert excinfo.value.reason == "deadline"
    assert waited < 5  # nowhere near the 30 s queue timeout
    assert past.value.reason == "deadline"
    assert limiter.queued == 0


async def test_every_slot_serves_normal_work_while_nothing_more_important_waits() -> None:
    for limit in (1, 4, 5, 50):
        limiter = ConcurrencyLimiter(limit)
        assert all(limiter.try_take(Priority.NORMAL) for _ in range(limit))
        assert not limiter.try_take(Priority.NORMAL)
        assert not limiter.try_take(Priority.CRITICAL)  # nothing is kept idle for it
        assert limiter.in_flight == limit
        for _ in range(limit):
            limiter.give_back()
        assert limiter.in_flight == 0
    lanes = ConcurrencyLimiter(5).snapshot()["lanes"]
    assert lanes == {"critical": 5, "normal": 5, "low": 3}


async def test_critical_jumps_the_queue_and_takes_the_next_free_slot() -> None:
    limiter = ConcurrencyLimiter(2, max_queue=10, queue_timeout=30)
    held = [await limiter.acquire(), await limiter.acquire()]
    order: list[object] = []
    async with anyio.create_task_group() as tg:
        await _spawn(tg, limiter, order, "normal-1", "normal-2")
        await _spawn(tg, limiter, order, "critical", priority=Priority.CRITICAL)
        assert limiter.queued == 3
        held[0].release()
        await wait_all_tasks_blocked()
        assert [tag for tag, _ in order] == ["critical"]  # type: ignore[misc]
        held[1].release()
        await wait_all_tasks_blocked()
        assert [tag for tag, _ in order] == ["critical", "normal-1"]  # type: ignore[misc]
        for permit in _permits(order):
            permit.release()
        await wait_all_tasks_blocked()
        for permit in _permits(order):
            permit.release()
    assert [tag for tag, _ in order] == ["critical", "normal-1", "normal-2"]  # type: ignore[misc]
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_reserved_slots_are_an_explicit_opt_in() -> None:
    limiter = ConcurrencyLimiter(4, max_queue=10, queue_timeout=5, reserve_critical=1)
    normals = [await limiter.acquire() for _ in range(3)]
    order: list[object] = []
    async with anyio.create_task_group() as tg:
        await _spawn(tg, limiter, order, "normal")
        assert limiter.queued == 1  # the fourth slot stays idle for critical work
        critical = await limiter.acquire(Priority.CRITICAL)
        assert limiter.in_flight == 4
        await _spawn(tg, limiter, order, "critical-2", priority=Priority.CRITICAL)
        critical.release()
        await wait_all_tasks_blocked()
        assert [tag for tag, _ in order] == ["critical-2"]  # type: ignore[misc]
        for permit in [*normals, *_permits(order)]:
            permit.release()
    for permit in _permits(order):
        permit.release()
    assert [tag for tag, _ in order] == ["critical-2", "normal"]  # type: ignore[misc]
    assert limiter.in_flight == 0
    assert limiter.snapshot()["lanes"] == {"critical": 4, "normal": 3, "low": 3}


async def test_critical_work_may_queue_one_place_per_slot_beyond_max_queue() -> None:
    limiter = ConcurrencyLimiter(2, max_queue=0, queue_timeout=30)
    held = [await limiter.acquire(), await limiter.acquire()]
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        await _spawn(tg, limiter, results, "normal")
        await _spawn(tg, limiter, results, "c1", "c2", "c3", priority=Priority.CRITICAL)
        assert results == [("normal", "queue_full"), ("c3", "queue_full")]
        assert limiter.queued == 2
        for permit in held:
            permit.release()
        await wait_all_tasks_blocked()
        for permit in _permits(results):
            permit.release()
    assert [tag for tag, _ in results] == ["normal", "c3", "c1", "c2"]  # type: ignore[misc]
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_low_priority_only_below_the_watermark() -> None:
    limiter = ConcurrencyLimiter(4, queue_timeout=0.05, low_watermark=0.5)  # low cap 2
    lows = [await limiter.acquire(Priority.LOW) for _ in range(2)]
    with pytest.raises(Shed, match="queue_timeout"):
        await limiter.acquire(Priority.LOW)
    normal = await limiter.acquire()
    assert limiter.in_flight == 3
    for permit in [*lows, normal]:
        permit.release()
    assert limiter.snapshot()["lanes"] == {"critical": 4, "normal": 4, "low": 2}


async def test_full_queue_evicts_the_newest_low_waiter_for_normal_work() -> None:
    limiter = ConcurrencyLimiter(1, max_queue=2, queue_timeout=5, reserve_critical=0)
    held = await limiter.acquire()
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        await _spawn(tg, limiter, results, "low-1", "low-2", priority=Priority.LOW)
        await _spawn(tg, limiter, results, "normal")
        assert results == [("low-2", "evicted")]
        assert limiter.queued == 2
        held.release()
        await wait_all_tasks_blocked()
        assert [tag for tag, _ in results] == ["low-2", "normal"]  # type: ignore[misc]
        for permit in _permits(results):
            permit.release()
        await wait_all_tasks_blocked()
        for permit in _permits(results):
            permit.release()
    assert [tag for tag, _ in results] == ["low-2", "normal", "low-1"]  # type: ignore[misc]
    assert limiter.snapshot()["shed_by_reason"] == {"evicted": 1}
    assert limiter.in_flight == 0


async def test_bulkhead_caps_its_work_inside_the_global_limit() -> None:
    limiter = ConcurrencyLimiter(5, queue_timeout=5, reserve_critical=0)
    reports = limiter.bulkhead("reports", 2)
    held = [await limiter.acquire(bulkhead=reports) for _ in range(2)]
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        await _spawn(tg, limiter, results, "report-3", bulkhead=reports)
        assert limiter.snapshot()["bulkheads"]["reports"] == {
            "limit": 2,
            "in_flight": 2,
            "queued": 1,
        }
        other = await limiter.acquire()  # global slots are still free for other work
        assert limiter.in_flight == 3
        held[0].release()
        await wait_all_tasks_blocked()
        assert [tag for tag, _ in results] == ["report-3"]  # type: ignore[misc]
        for permit in [held[1], other, *_permits(results)]:
            permit.release()
    assert limiter.snapshot()["bulkheads"]["reports"]["in_flight"] == 0
    assert limiter.in_flight == 0


async def test_bulkhead_holder_waiting_for_a_global_slot_gives_both_back_on_timeout() -> None:
    limiter = ConcurrencyLimiter(1, queue_timeout=0.05)
    reports = limiter.bulkhead("reports", 1)
    async with limiter.slot():
        with pytest.raises(Shed, match="queue_timeout"):
            await limiter.acquire(bulkhead=reports)
    assert limiter.snapshot()["bulkheads"]["reports"] == {"limit": 1, "in_flight": 0, "queued": 0}
    assert limiter.in_flight == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    limiter = ConcurrencyLimiter(1, queue_timeout=30)
    held = await limiter.acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire)
        await wait_all_tasks_blocked()
        assert limiter.queued == 1
        tg.cancel_scope.cancel()
    assert (limiter.queued, limiter.in_flight) == (0, 1)
    held.release()
    assert limiter.in_flight == 0


async def test_waiter_cancelled_in_the_instant_it_is_granted_passes_the_slot_on() -> None:
    # asyncio directly: Task.cancel() lands even after the wake-up was scheduled, which
    # is exactly the race a server's cancellation of a request can hit.
    limiter = ConcurrencyLimiter(1, max_queue=5, queue_timeout=30)
    held = await limiter.acquire()
    doomed = asyncio.ensure_future(limiter.acquire())
    await wait_all_tasks_blocked()
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        await _spawn(tg, limiter, results, "next")
        assert limiter.queued == 2
        held.release()  # granted to the doomed waiter, synchronously...
        assert (limiter.in_flight, limiter.queued) == (1, 1)
        doomed.cancel()  # ...and cancelled before it could run
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await wait_all_tasks_blocked()
        assert [tag for tag, _ in results] == ["next"]  # type: ignore[misc]
        assert limiter.in_flight == 1
        for permit in _permits(results):
            permit.release()
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_permit_release_is_idempotent() -> None:
    limiter = ConcurrencyLimiter(2)
    permit = await limiter.acquire()
    other = await limiter.acquire()
    permit.release()
    permit.release()
    assert permit.released
    assert limiter.in_flight == 1
    other.release()
    assert limiter.in_flight == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, "limit must be a whole number of slots >= 1"),
        ({"limit": 2, "max_queue": -1}, "max_queue must be a whole number >= 0"),
        ({"limit": 2, "queue_timeout": -1}, "queue_timeout must be a finite number"),
        ({"limit": 2, "reserve_critical": 2}, "reserve_critical must be a whole number from 0"),
        ({"limit": 2, "low_watermark": 0}, "low_watermark must be a fraction in (0, 1]"),
        ({"limit": 2, "delay_interval": -1}, "delay_interval must be a finite number"),
        ({"limit": 2, "delay_target": -0.1}, "delay_target must be a finite number"),
        ({"limit": 2, "delay_target_holds": -1}, "delay_target_holds must be a number >= 0"),
    ],
)
def test_bad_configuration_says_what_to_change(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ConcurrencyLimiter(**kwargs)  # type: ignore[arg-type]


def test_no_slot_is_reserved_unless_asked() -> None:
    assert ConcurrencyLimiter(4).reserve_critical == 0
    assert ConcurrencyLimiter(50).reserve_critical == 0
    assert ConcurrencyLimiter(50, reserve_critical=5).snapshot()["lanes"]["normal"] == 45


# -- generated interleavings -----------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.sampled_from(list(Priority)), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 20), st.booleans()),
        st.tuples(st.just("cancel"), st.integers(0, 20), st.booleans()),
        st.tuples(st.just("expire"), st.integers(0, 20), st.booleans()),
        st.tuples(st.just("sleep"), st.integers(0, 2), st.booleans()),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(1, 5),
    max_queue=st.integers(0, 4),
    bulkhead_limit=st.integers(1, 3),
    queue_timeout=st.sampled_from([30.0, 0.002]),
    ops=_ops,
)
def test_random_interleavings_keep_exact_accounting(
    limit: int,
    max_queue: int,
    bulkhead_limit: int,
    queue_timeout: float,
    ops: list[tuple[str, object, bool]],
) -> None:
    """Admit, release, cancel and time out in any order: in_flight never exceeds the
    limit, always equals the permits held, and returns to 0 at the end. With the short
    queue_timeout, real timeouts race the grants that releases hand out."""

    async def scenario() -> None:
        limiter = ConcurrencyLimiter(limit, max_queue=max_queue, queue_timeout=queue_timeout)
        bulkhead = limiter.bulkhead("b", bulkhead_limit)
        held: list[Permit] = []
        waiting: list[anyio.CancelScope] = []

        async def request(priority: Priority, in_bulkhead: bool, scope: anyio.CancelScope) -> None:
            with scope:
                try:
                    permit = await limiter.acquire(
                        priority, bulkhead=bulkhead if in_bulkhead else None
                    )
                except Shed:
                    return
                held.append(permit)

        def check() -> None:
            live = [p for p in held if not p.released]
            assert limiter.in_flight == len(live) <= limit
            b = limiter.snapshot()["bulkheads"]["b"]
            assert b["in_flight"] <= bulkhead_limit
            # Global queue + bulkhead queue; critical work may go one place per slot
            # beyond max_queue in each.
            assert limiter.queued <= 2 * max_queue + limit + bulkhead_limit

        async with anyio.create_task_group() as tg:
            for op, arg, flag in ops:
                if op == "acquire":
                    scope = anyio.CancelScope()
                    waiting.append(scope)
                    tg.start_soon(request, arg, flag, scope)
                elif op == "sleep":
                    await anyio.sleep(0.001 * int(arg))  # type: ignore[call-overload]
                elif op == "release":
                    live = [p for p in held if not p.released]
                    if live:
                        live[int(arg) % len(live)].release()  # type: ignore[call-overload]
                elif waiting:
                    # "cancel" and "expire" both end a waiter early; expire also lets
                    # the event loop run first, so a grant may land in between.
                    victim = waiting[int(arg) % len(waiting)]  # type: ignore[call-overload]
                    if op == "expire":
                        await anyio.lowlevel.checkpoint()
                    victim.cancel()
                if flag:
                    await wait_all_tasks_blocked()
                    check()
            await wait_all_tasks_blocked()
            check()
            for scope in waiting:
                scope.cancel()
            await wait_all_tasks_blocked()
            for permit in held:
                permit.release()
        assert (limiter.in_flight, limiter.queued) == (0, 0)
        assert limiter.snapshot()["bulkheads"]["b"] == {
            "limit": bulkhead_limit,
            "in_flight": 0,
            "queued": 0,
        }

    anyio.run(scenario)


async def test_set_limit_shrinks_without_cutting_work_and_grows_admitting_waiters() -> None:
    limiter = ConcurrencyLimiter(4, max_queue=10, queue_timeout=5, reserve_critical=0)
    held = [limiter.try_acquire() for _ in range(4)]
    assert all(held)
    limiter.set_limit(2)  # four still run; nobody new until fewer than two are busy
    assert limiter.try_acquire() is None
    for permit in held[:3]:
        assert permit is not None
        permit.release()
    assert limiter.in_flight == 1
    second = limiter.try_acquire()
    assert second is not None
    assert limiter.try_acquire() is None
    limiter.set_limit(0)
    granted: list[Permit] = []

    async def wait() -> None:
        granted.append(await limiter.acquire())

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await wait_all_tasks_blocked()
        assert limiter.queued == 1
        assert limiter.snapshot()["utilization"] == 1.0
        limiter.set_limit(10)  # capped at the configured 4; the waiter gets in at once
    assert limiter.limit == 4
    assert len(granted) == 1
    for permit in (held[3], second, granted[0]):
        assert permit is not None
        permit.release()
    assert limiter.in_flight == 0
    with pytest.raises(ValueError, match="limit must be a whole number >= 0"):
        limiter.set_limit(-1)


# -- expected waits and controlled delay, on a clock that moves only when told ---------


class FakeClock:
    """The limiter's clock, moved by hand: every interval below is exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Callers:
    """Callers of one limiter, each in its own task, and what became of each by tag."""

    def __init__(self, limiter: ConcurrencyLimiter, tg: TaskGroup) -> None:
        self.limiter = limiter
        self.tg = tg
        self.results: dict[str, Permit | str] = {}

    async def arrive(self, *tags: str, priority: Priority = Priority.NORMAL, **kw: object) -> None:
        for tag in tags:
            self.tg.start_soon(self._call, tag, priority, kw)
            await wait_all_tasks_blocked()

    async def _call(self, tag: str, priority: Priority, kw: dict[str, object]) -> None:
        try:
            self.results[tag] = await self.limiter.acquire(priority, **kw)  # type: ignore[arg-type]
        except Shed as exc:
            self.results[tag] = exc.reason

    async def release(self, tag: str) -> None:
        permit = self.results[tag]
        assert isinstance(permit, Permit), f"{tag} holds no slot: {permit!r}"
        permit.release()
        await wait_all_tasks_blocked()

    def shed(self) -> dict[str, str]:
        return {tag: r for tag, r in self.results.items() if isinstance(r, str)}

    def admitted(self) -> list[str]:
        return [tag for tag, r in self.results.items() if isinstance(r, Permit)]

    async def release_all(self) -> None:
        while live := [
            p for p in self.results.values() if isinstance(p, Permit) and not p.released
        ]:
            for permit in live:
                permit.release()
            await wait_all_tasks_blocked()


async def _learn_a_hold_of_80(callers: Callers, clock: FakeClock) -> None:
    """Two slots busy, two callers wait; the slots come back at t=0 and t=40.

    The first hand-off has nothing to compare with; the second comes 40 s later with
    two slots busy: one hold sample of 40 x 2 = 80 s. Both waiters then hold the
    slots, the queue is empty (since t=40) and its busy period began at t=0.
    """
    await callers.arrive("first", "second")
    await callers.arrive("w1", "w2")
    assert callers.limiter.hold_estimate is None
    await callers.release("first")
    assert callers.limiter.hold_estimate is None
    clock.now = 40.0
    await callers.release("second")
    assert callers.limiter.hold_estimate == 80.0
    assert (callers.limiter.in_flight, callers.limiter.queued) == (2, 0)


async def test_hold_is_learnt_from_hand_offs_with_no_idle_slot_between() -> None:
    clock = FakeClock()
    limiter = ConcurrencyLimiter(2, queue_timeout=1000, delay_interval=None, clock=clock)
    async with anyio.create_task_group() as tg:
        callers = Callers(limiter, tg)
        await _learn_a_hold_of_80(callers, clock)  # last hand-off at t=40
        await callers.arrive("w3")
        clock.now = 70.0
        await callers.release("w1")  # no release since t=40: 30 x 2 = 60, mean 70
        assert limiter.hold_estimate == 70.0
        await callers.arrive("w4", "w5")
        clock.now = 150.0
        await callers.release("w2")  # 80 x 2 = 160: mean of 80, 60, 160
        assert limiter.hold_estimate == 100.0
        clock.now = 200.0
        await callers.release("w3")  # 50 x 2 = 100: the mean stays 100; nobody waits now
        clock.now = 210.0
        await callers.release("w4")  # nobody waiting: the slot goes idle...
        await callers.arrive("w6", "w7")  # ...until w6 takes it; w7 waits
        assert callers.admitted()[-1] == "w6"
        clock.now = 300.0
        await callers.release("w5")  # a hand-off, but the last was before the idle slot
        assert limiter.hold_estimate == 100.0
        await callers.release_all()
    assert (limiter.in_flight, limiter.queued, limiter.shed_total) == (0, 0, 0)


async def test_a_slot_given_back_to_nobody_ends_the_measurement() -> None:
    clock = FakeClock()
    limiter = ConcurrencyLimiter(2, queue_timeout=1000, delay_interval=None, clock=clock)
    async with anyio.create_task_group() as tg:
        callers = Callers(limiter, tg)
        assert limiter.try_take(Priority.NORMAL)
        assert limiter.try_take(Priority.NORMAL)
        await callers.arrive("w1")
        limiter.give_back()  # t=0: a hand-off to w1, the first
        await wait_all_tasks_blocked()
        clock.now = 10.0
        limiter.give_back()  # nobody waits: this slot may stay idle
        assert limiter.try_take(Priority.NORMAL)  # t=10: taken again at once
        await callers.arrive("w2")
        clock.now = 30.0
        await callers.release("w1")  # a hand-off, but not a sample: a slot was free
        assert limiter.hold_estimate is None
        await callers.arrive("w3")
        clock.now = 40.0
        limiter.give_back()  # 10 s x 2 busy
        await wait_all_tasks_blocked()
        assert limiter.hold_estimate == 20.0
        await callers.release_all()
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_nobody_is_shed_early_before_a_hold_has_been_measured() -> None:
    clock = FakeClock()
    limiter = ConcurrencyLimiter(1, queue_timeout=1000, clock=clock)
    async with anyio.create_task_group() as tg:
        callers = Callers(limiter, tg)
        await callers.arrive(*[f"c{i}" for i in range(21)])
        clock.now = 999.0
        await callers.arrive("late")
        assert limiter.queued == 21
        snapshot = limiter.snapshot()
        assert (snapshot["hold_estimate"], snapshot["early_shed_total"]) == (None, 0)
        assert snapshot["controlled_delay"] is False
        await callers.release_all()
    assert callers.shed() == {}
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_a_caller_that_would_wait_past_its_queue_timeout_or_deadline_is_shed_at_once() -> (
    None
):
    clock = FakeClock()
    # Hold 80 s on two slots: a newcomer waits (ahead + 1) x 40 s.
    limiter = ConcurrencyLimiter(2, queue_timeout=100, delay_interval=None, clock=clock)
    async with anyio.create_task_group() as tg:
        callers = Callers(limiter, tg)
        await _learn_a_hold_of_80(callers, clock)
        await callers.arrive("40s")
        await callers.arrive("deadline", deadline=clock.now + 79)  # expected 80 s
        await callers.arrive("80s")
        await callers.arrive("120s")  # over the 100 s queue timeout
        await callers.arrive("critical", priority=Priority.CRITICAL, deadline=clock.now + 41)
        assert callers.shed() == {"deadline": "deadline", "120s": "queue_timeout"}
        assert limiter.queued == 3  # critical work has only critical work ahead of it
        snapshot = limiter.snapshot()
        assert (snapshot["early_shed_total"], snapshot["shed_total"]) == (2, 2)
        assert snapshot["shed_by_reason"] == {"queue_timeout": 1, "deadline": 1}
        await callers.release_all()
    assert callers.admitted() == ["first", "second", "w1", "w2", "critical", "40s", "80s"]
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_controlled_delay_starts_when_the_queue_has_not_drained_for_the_interval() -> None:
    clock = FakeClock()
    # Target max(0.005, 0.25 x 80) = 20 s: under controlled delay a newcomer may queue
    # only as the head (exempt, though it expects 40 s) or as critical work.
    limiter = ConcurrencyLimiter(2, queue_timeout=1000, delay_interval=200, clock=clock)
    async with anyio.create_task_group() as tg:
        callers = Callers(limiter, tg)
        await _learn_a_hold_of_80(callers, clock)  # busy since t=0
        clock.now = 100.0  # empty since t=40, less than a hold: still the same busy period
        await callers.arrive("n1", "n2", "n3")  # 40, 80, 120 s: all within the timeout
        assert (limiter.queued, limiter.controlled_delay) == (3, False)
        clock.now = 200.0
        await callers.arrive("n4")  # expected 160 s > 20 s
        await callers.arrive("c1", "c2", priority=Priority.CRITICAL)  # exempt
        assert callers.shed() == {"n4": "queue_timeout"}
        assert (limiter.queued, limiter.controlled_delay) == (5, True)
        assert limiter.snapshot()["early_shed_total"] == 1
        await callers.release_all()
    assert callers.admitted()[4:] == ["c1", "c2", "n1", "n2", "n3"]
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_controlled_delay_ends_only_when_the_queue_stays_empty_for_half_the_interval() -> (
    None
):
    clock = FakeClock()
    # Target max(0.005, 0.25 x 80) = 20 s: the head alone may queue.
    limiter = ConcurrencyLimiter(2, queue_timeout=1000, delay_interval=200, clock=clock)
    async with anyio.create_task_group() as tg:
        callers = Callers(limiter, tg)
        await _learn_a_hold_of_80(callers, clock)  # busy since t=0, empty since t=40
        clock.now = 60.0
        await callers.arrive("h1", "h2", "h3")  # 40, 80, 120 s: no controlled delay yet
        for now, leaving in ((80.0, "w1"), (120.0, "w2"), (160.0, "h1")):
            clock.now = now
            await callers.release(leaving)  # every 40 s with two slots busy: hold 80
        assert (limiter.queued, limiter.hold_estimate) == (0, 80.0)
        clock.now = 200.0  # busy since t=0 (empty only for 40 s, under a hold)
        await callers.arrive("a", "b")  # a is the head (exempt); b would wait 80 s
        assert callers.shed() == {"b": "queue_timeout"}
        await callers.release("h2")  # a gets the slot; the queue is empty from t=200
        assert limiter.controlled_delay
        clock.now = 290.0  # empty for longer than a hold, but not half the interval
        await callers.arrive("x", "y")
        assert callers.shed()["y"] == "queue_timeout"
        clock.now = 300.0
        await callers.release("h3")  # x gets the slot: 100 x 2 = 200, the mean 100
        assert (limiter.queued, limiter.hold_estimate) == (0, 100.0)
        clock.now = 399.0
        assert limiter.controlled_delay
        clock.now = 400.0  # empty for half the interval: over
        assert not limiter.controlled_delay
        await callers.arrive("p", "q", "r")  # 50, 100, 150 s: the full queue timeout
        assert (limiter.queued, limiter.controlled_delay) == (3, False)
        assert limiter.snapshot()["early_shed_total"] == 2
        await callers.release_all()
    assert sorted(callers.shed()) == ["b", "y"]
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_after_controlled_delay_ends_it_takes_a_new_interval_to_start_again() -> None:
    clock = FakeClock()
    # Holds of 80 s and an interval of 100 s: controlled delay ends after 50 s of empty
    # queue, before the queue counts as drained (a hold): the busy period ends with it.
    limiter = ConcurrencyLimiter(2, queue_timeout=1000, delay_interval=100, clock=clock)
    async with anyio.create_task_group() as tg:
        callers = Callers(limiter, tg)
        await _learn_a_hold_of_80(callers, clock)
        clock.now = 60.0
        await callers.arrive("h1", "h2")
        clock.now = 80.0
        await callers.release("w1")
        clock.now = 100.0
        await callers.arrive("c")  # busy for the interval: 80 s > 20 s
        assert callers.shed() == {"c": "queue_timeout"}
        clock.now = 120.0
        await callers.release("w2")  # the queue is empty from t=120
        clock.now = 170.0
        await callers.arrive("n1", "n2", "n3")  # 40, 80, 120 s
        assert (limiter.queued, limiter.controlled_delay) == (3, False)
        await callers.release_all()
    assert callers.shed() == {"c": "queue_timeout"}
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_low_work_is_capped_by_its_watermark_and_evicted_first() -> None:
    clock = FakeClock()
    limiter = ConcurrencyLimiter(4, max_queue=2, low_watermark=0.5, queue_timeout=100, clock=clock)
    async with anyio.create_task_group() as tg:
        callers = Callers(limiter, tg)
        await callers.arrive("low-1", "low-2", "low-3", priority=Priority.LOW)
        assert (limiter.in_flight, limiter.queued) == (2, 1)  # low may use 2 of 4 slots
        await callers.arrive("n1", "n2")  # normal work uses the two slots low may not
        await callers.arrive("n3", "n4")  # a full queue: the newest low waiter is evicted
        assert callers.shed() == {"low-3": "evicted"}
        await callers.arrive("n5")
        assert callers.shed()["n5"] == "queue_full"
        await callers.release("low-1")  # normal work first
        await callers.release("n1")
        assert callers.admitted()[-2:] == ["n3", "n4"]
        await callers.release_all()
    assert (limiter.in_flight, limiter.queued) == (0, 0)
