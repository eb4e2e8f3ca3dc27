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


async def test_critical_jumps_the_queue_and_uses_the_reserved_slot() -> None:
    limiter = ConcurrencyLimiter(4, max_queue=10, queue_timeout=5)  # reserve_critical = 1
    normals = [await limiter.acquire() for _ in range(3)]
    order: list[object] = []
    async with anyio.create_task_group() as tg:
        await _spawn(tg, limiter, order, "normal")
        assert limiter.queued == 1  # the fourth slot is kept for critical work
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


async def test_low_priority_only_below_the_watermark() -> None:
    limiter = ConcurrencyLimiter(4, queue_timeout=0.05, low_watermark=0.5)  # low cap 2
    lows = [await limiter.acquire(Priority.LOW) for _ in range(2)]
    with pytest.raises(Shed, match="queue_timeout"):
        await limiter.acquire(Priority.LOW)
    normal = await limiter.acquire()
    assert limiter.in_flight == 3
    for permit in [*lows, normal]:
        permit.release()
    assert limiter.snapshot()["lanes"] == {"critical": 4, "normal": 3, "low": 2}


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
    ],
)
def test_bad_configuration_says_what_to_change(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ConcurrencyLimiter(**kwargs)  # type: ignore[arg-type]


def test_default_reserve_for_critical_work() -> None:
    assert ConcurrencyLimiter(3).reserve_critical == 0
    assert ConcurrencyLimiter(4).reserve_critical == 1
    assert ConcurrencyLimiter(50).reserve_critical == 5


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
            assert limiter.queued <= 2 * max_queue  # global queue + bulkhead queue

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
