"""Guards sharing one budget through Redis in one event loop, as processes would.

Each guard has its own coordinator and its own Redis connections; :class:`Load` keeps
them busy and tracks the fleet's peak of slots in use, the exact ground truth here.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from redis.asyncio import Redis

import guardrails as gr
from guardrails.coordination.coordinator import RedisCoordinator

TTL = 1.0


def unique(prefix: str) -> str:
    return f"{prefix}-{random.getrandbits(32):08x}"


@asynccontextmanager
async def fleet(
    url: str | Callable[[], Any],
    count: int,
    *,
    budget: int,
    concurrency: int,
    name: str,
    per_process: int | None = None,
    breaker: gr.BreakerSettings | None = None,
    lease_ttl: float = TTL,
    adaptive: dict[int, gr.AdaptiveLimit] | None = None,
) -> AsyncIterator[list[gr.Guardrails]]:
    """``count`` guards sharing one budget through Redis, their coordinators running.

    ``url`` is a Redis URL, or a function making each guard a client of its own (the
    clients stay the caller's: closed here after the guards). ``adaptive`` gives the
    guards at those indexes an adaptive limit.
    """
    clients: list[Any] = []

    def target() -> Any:
        if not callable(url):
            return url
        clients.append(url())
        return clients[-1]

    guards = [
        gr.Guardrails(
            concurrency=concurrency,
            queue_timeout=5.0,
            max_queue=1000,
            breaker=breaker,
            adaptive=(adaptive or {}).get(index),
            coordinator=RedisCoordinator(
                target(),
                budget=budget,
                per_process=per_process,
                name=name,
                lease_ttl=lease_ttl,
            ),
        )
        for index in range(count)
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
        for client in clients:
            await client.aclose()


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


def held(guard: gr.Guardrails) -> int:
    """Slots the guard's coordinator holds on record (0 while not connected)."""
    return int(coordinator_of(guard).snapshot()["held"] or 0)


async def recorded(url: str, name: str) -> dict[bytes, int]:
    """The leases on record in Redis for budget ``name``, read with a client of our own."""
    raw = Redis.from_url(url)
    try:
        return {k: int(v) for k, v in (await raw.hgetall(f"guardrails:{{{name}}}:held")).items()}
    finally:
        await raw.aclose()


def settled(guards: list[gr.Guardrails]) -> bool:
    """Every guard shares the budget through Redis, past the settling of a new generation."""
    return all(coordinator_of(g).snapshot()["mode"] == "shared" for g in guards)


def sharing(guards: list[gr.Guardrails], budget: int) -> bool:
    """Every guard holds some of the budget, and together all of it."""
    return all(held(g) > 0 for g in guards) and sum(held(g) for g in guards) == budget


class Load:
    """Saturating workers per guard (take a slot, hold it 20 ms, again) and the fleet's peak."""

    def __init__(self, guards: list[gr.Guardrails]) -> None:
        self.guards = guards
        self.done = [0] * len(guards)
        self.shed = 0
        self.peak = 0
        self._stopping = False
        self._tasks = [asyncio.create_task(self._sample())]

    def start(self, index: int, workers: int) -> None:
        self._tasks += [asyncio.create_task(self._work(index)) for _ in range(workers)]

    async def _work(self, index: int) -> None:
        guard = self.guards[index]
        while not self._stopping:
            try:
                async with guard.limiter.slot():
                    await asyncio.sleep(0.02)
            except gr.Shed:
                self.shed += 1
                continue
            self.done[index] += 1

    async def _sample(self) -> None:
        while not self._stopping:
            self.peak = max(self.peak, sum(g.limiter.in_flight for g in self.guards))
            await asyncio.sleep(0)

    async def completed_within(self, window: float) -> list[int]:
        """Requests each guard completed during the next ``window`` seconds."""
        before = list(self.done)
        await asyncio.sleep(window)
        return [after - start for after, start in zip(self.done, before, strict=True)]

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*self._tasks)


def generations(guards: list[gr.Guardrails]) -> list[int]:
    """Times each guard saw Redis forget the records (restart, flush, failover)."""
    return [int(coordinator_of(g).snapshot()["generations_total"]) for g in guards]
