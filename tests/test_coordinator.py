"""RedisCoordinator on a real redis-server: the shared budget, the shared breaker, Redis down.

The first tests run several guards in one event loop, each with its own coordinator and
its own Redis connections, as separate processes would. The fleet tests further down run
real uvicorn servers against a real PostgreSQL with few connections.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from pgcluster import free_port
from redisserver import RedisServer

import guardrails as gr
from guardrails.coordinator import RedisCoordinator

pytestmark = pytest.mark.anyio

TTL = 1.0


def unique(prefix: str) -> str:
    return f"{prefix}-{random.getrandbits(32):08x}"


@asynccontextmanager
async def fleet(
    url: str,
    count: int,
    *,
    budget: int,
    concurrency: int,
    name: str,
    per_process: int | None = None,
    breaker: gr.BreakerSettings | None = None,
) -> AsyncIterator[list[gr.Guardrails]]:
    """``count`` guards sharing one budget through Redis, their coordinators running."""
    guards = [
        gr.Guardrails(
            concurrency=concurrency,
            queue_timeout=5.0,
            max_queue=1000,
            breaker=breaker,
            coordinator=RedisCoordinator(
                url, budget=budget, per_process=per_process, name=name, lease_ttl=TTL
            ),
        )
        for _ in range(count)
    ]
    tasks = [asyncio.create_task(g.coordinator.start()) for g in guards]  # type: ignore[union-attr]
    try:
        yield guards
    finally:
        for guard in guards:
            await guard.aclose()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_until(check: Callable[[], bool], within: float, step: float = 0.01) -> float:
    """Seconds until ``check()`` held; fails the test after ``within`` seconds."""
    start = anyio.current_time()
    with anyio.fail_after(within):
        while not check():
            await anyio.sleep(step)
    return anyio.current_time() - start


def coordinator_of(guard: gr.Guardrails) -> RedisCoordinator:
    assert isinstance(guard.coordinator, RedisCoordinator)
    return guard.coordinator


# -- construction --------------------------------------------------------------------


def test_bad_settings_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RedisCoordinator("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="budget must be a whole number >= 1"):
        RedisCoordinator("redis://127.0.0.1:6379/0", budget=0)
    with pytest.raises(ValueError, match="lease_ttl"):
        RedisCoordinator("redis://127.0.0.1:6379/0", budget=5, lease_ttl=0.1)
    with pytest.raises(ValueError, match="timeout must be above 0 and below lease_ttl / 3"):
        RedisCoordinator("redis://127.0.0.1:6379/0", budget=5, lease_ttl=1.0, timeout=0.5)
    with pytest.raises(ValueError, match="needs the global budget"):
        gr.Guardrails(concurrency=4, coordinator=RedisCoordinator("redis://127.0.0.1:6379/0"))


def test_takes_the_budget_from_the_guard_and_admits_nobody_until_leased() -> None:
    budget = gr.ConnectionBudget(max_connections=40, reserved=4, processes=3)
    coordinator = RedisCoordinator("redis://127.0.0.1:1/0")
    guard = gr.Guardrails(budget=budget, coordinator=coordinator)
    assert coordinator.budget == budget.app_total
    assert coordinator.per_process == budget.per_process
    assert guard.limiter.limit == 0  # the startup window: no slot until Redis grants one
    snapshot = guard.snapshot()["coordinator"]
    assert snapshot["mode"] == "starting"
    assert "password" not in repr(snapshot)


# -- the shared budget ---------------------------------------------------------------


async def test_admitted_work_across_guards_never_exceeds_the_budget(redis_url: str) -> None:
    budget = 7
    async with fleet(redis_url, 3, budget=budget, concurrency=6, name=unique("budget")) as guards:
        peak = 0
        done = 0
        stop = False

        async def sampler() -> None:
            nonlocal peak
            while not stop:
                total = sum(g.limiter.in_flight for g in guards)
                peak = max(peak, total)
                assert total <= budget, [g.limiter.snapshot() for g in guards]
                await asyncio.sleep(0)

        async def worker(guard: gr.Guardrails) -> None:
            nonlocal done
            for _ in range(12):
                async with guard.limiter.slot():
                    await asyncio.sleep(random.uniform(0.005, 0.03))
                done += 1

        watch = asyncio.create_task(sampler())
        await asyncio.gather(*(worker(g) for g in guards for _ in range(6)))
        stop = True
        await watch
        assert done == 3 * 6 * 12
        assert peak == budget  # demand was far above it: the budget was used, not wasted
        held = [coordinator_of(g).snapshot()["held"] for g in guards]
        assert sum(held) <= budget


async def test_a_busy_process_gets_the_slots_idle_ones_leave(redis_url: str) -> None:
    async with fleet(redis_url, 3, budget=6, concurrency=6, name=unique("idle")) as guards:
        busy, *idle = guards
        hold = asyncio.Event()
        admitted = 0

        async def user() -> None:
            nonlocal admitted
            async with busy.limiter.slot(gr.Priority.CRITICAL):
                admitted += 1
                await hold.wait()

        users = [asyncio.create_task(user()) for _ in range(6)]
        await wait_until(lambda: admitted == 6, within=3 * TTL)
        assert all(g.limiter.in_flight == 0 for g in idle)
        hold.set()
        await asyncio.gather(*users)


async def test_redis_unreachable_falls_back_to_per_process_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    caplog.set_level(logging.WARNING, logger="guardrails")
    async with fleet(url, 1, budget=10, concurrency=6, per_process=2, name="down") as (guard,):
        await wait_until(lambda: guard.limiter.limit == 2, within=2)
        await wait_until(lambda: coordinator_of(guard).errors_total >= 2, within=3)
        async with guard.limiter.slot(), guard.limiter.slot():
            assert guard.limiter.try_acquire() is None  # the local cap holds
        snapshot = guard.snapshot()["coordinator"]
        assert snapshot["mode"] == "local"
        assert snapshot["connected"] is False
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]


async def test_rejoins_when_redis_comes_back(redis_factory: Callable[[], RedisServer]) -> None:
    server = redis_factory()
    async with fleet(server.url, 2, budget=4, concurrency=4, per_process=1, name="back") as guards:
        await wait_until(lambda: all(coordinator_of(g).snapshot()["connected"] for g in guards), 2)
        server.stop()
        await wait_until(lambda: all(g.limiter.limit == 1 for g in guards), within=2)
        server.start()
        await wait_until(lambda: all(coordinator_of(g).snapshot()["connected"] for g in guards), 3)
        # Back to sharing: one guard alone may now use more than its local cap.
        permits = []
        for _ in range(3):
            permits.append(await guards[0].limiter.acquire())
        assert guards[0].limiter.in_flight == 3
        for permit in permits:
            permit.release()
    server.close()


# -- the shared breaker --------------------------------------------------------------


async def refused() -> None:
    """A real outage: a connection refused by a port nobody listens on."""
    _, writer = await asyncio.open_connection("127.0.0.1", free_port())
    writer.close()


async def test_an_open_breaker_is_seen_by_every_guard_and_one_trial_closes_it(
    redis_url: str,
) -> None:
    settings = gr.BreakerSettings(fail_max=1, reset_timeout=0.5)
    async with fleet(
        redis_url, 3, budget=6, concurrency=2, name=unique("breaker"), breaker=settings
    ) as guards:
        await wait_until(lambda: all(coordinator_of(g).snapshot()["connected"] for g in guards), 2)
        first, *others = guards
        with pytest.raises(ConnectionRefusedError):
            await first.breaker.call(refused)
        assert first.breaker.state == "open"
        seen = await wait_until(lambda: all(g.breaker.state == "open" for g in others), within=1)
        assert seen < 1.0
        for guard in others:
            with pytest.raises(gr.Unavailable):
                guard.breaker.admit()
        # After the open period, every guard keeps asking; exactly one is let through.
        trials: list[tuple[gr.Guardrails, gr.breaker.Trial]] = []

        def ask() -> bool:
            for guard in guards:
                try:
                    trial = guard.breaker.admit()
                except gr.Unavailable:
                    continue
                assert trial is not None
                trials.append((guard, trial))
            return bool(trials)

        await wait_until(ask, within=3)
        await asyncio.sleep(0.3)
        ask()
        assert len(trials) == 1
        owner, trial = trials[0]
        owner.breaker.record(trial)  # the trial succeeded: the database is back
        assert owner.breaker.state == "closed"
        await wait_until(lambda: all(g.breaker.state == "closed" for g in guards), within=1)
        half_open = [g.telemetry.breaker_transitions.get("half_open", 0) for g in guards]
        assert sum(half_open) == 1  # one trial for the fleet, not one per process
