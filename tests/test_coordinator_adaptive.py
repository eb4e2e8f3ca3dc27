"""An adaptive limit under a lease, on a real redis-server: what a guard asks Redis for.

A guard with an adaptive limit uses no more slots than that limit, whatever its lease
says; so it must not keep more on record either, or the slots it cannot use are lost
to the guards that can. Its limit is lowered here the way the middleware lowers it:
real slot holds, each fed to ``limiter.completed`` when it ends.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest
from guardfleet import Load, coordinator_of, fleet, held, recorded, unique, wait_until

import guardrails as gr

pytestmark = pytest.mark.anyio

BUDGET = 6
CONCURRENCY = 6
FLOOR = 2
"""The lowered limit: below the fair share of two guards (3), so keeping it shows."""


async def hold(guard: gr.Guardrails, seconds: float) -> None:
    """Take a slot, hold it ``seconds``, give it back, and tell the limiter it completed."""
    limiter = guard.limiter
    adaptive = limiter.adaptive
    assert adaptive is not None
    async with limiter.slot():
        started = adaptive.clock()
        await anyio.sleep(seconds)
    limiter.completed(started)


async def lower(guard: gr.Guardrails) -> None:
    """Short holds until a baseline is learnt, then long ones until the limit is at its floor."""
    adaptive = guard.limiter.adaptive
    assert adaptive is not None
    with anyio.fail_after(20):
        while adaptive.baseline is None:
            await asyncio.gather(hold(guard, 0.001), hold(guard, 0.001))
        while adaptive.limit > FLOOR:
            # Well past the tolerance (1.5 x the baseline), however slow the machine is.
            slow = max(0.05, 4 * adaptive.baseline)
            await asyncio.gather(hold(guard, slow), hold(guard, slow))


async def test_a_guard_whose_adaptive_limit_fell_leaves_its_slots_to_the_others(
    redis_url: str,
) -> None:
    name = unique("adaptive")
    settings = gr.AdaptiveLimit(floor=FLOOR, window=0.02, min_samples=2, smoothing=1.0)
    async with fleet(
        redis_url,
        2,
        budget=BUDGET,
        concurrency=CONCURRENCY,
        name=name,
        adaptive={0: settings},
    ) as guards:
        lowered, other = guards
        await wait_until(lambda: coordinator_of(lowered).snapshot()["mode"] == "shared", 5)
        await lower(lowered)
        assert lowered.limiter.wanted == FLOOR
        me = coordinator_of(lowered).process_id.encode()
        load = Load(guards)
        records: list[dict[bytes, int]] = []
        try:
            load.start(0, 10)
            load.start(1, 10)

            # Both saturated: the lowered guard keeps on record no more than it can use...
            with anyio.fail_after(10):
                while True:
                    records.append(await recorded(redis_url, name))
                    if records[-1].get(me, 0) <= FLOOR and held(other) == BUDGET - FLOOR:
                        break
                    await anyio.sleep(0.01)
            # ...and the other leases and uses the slots it left, not just its fair share.
            await wait_until(lambda: other.limiter.in_flight == BUDGET - FLOOR, within=5)
            # It stays so through several renewals of both, while demand lasts.
            renewed = [coordinator_of(g).renewals_total for g in guards]
            with anyio.fail_after(10):
                while any(
                    coordinator_of(g).renewals_total < n + 3
                    for g, n in zip(guards, renewed, strict=True)
                ):
                    now = await recorded(redis_url, name)
                    records.append(now)
                    assert now.get(me, 0) <= FLOOR, now
                    assert lowered.limiter.limit <= FLOOR
                    await anyio.sleep(0.01)
            assert held(other) == BUDGET - FLOOR
            assert lowered.limiter.wanted == FLOOR  # nothing fed it meanwhile
        finally:
            await load.stop()
    # The fleet stayed inside the budget throughout: in use, and on record.
    assert load.peak <= BUDGET
    assert all(sum(r.values()) <= BUDGET for r in records), records
    assert all(n > 0 for n in load.done), load.done
