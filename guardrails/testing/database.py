"""Make the database look down, slow or exhausted to a guard, without touching the database.

A :class:`DatabaseFault` sits on the pool watchers' fault hook
(:attr:`PoolWatcher.fault <guardrails.pools.PoolWatcher.fault>`): each acquire on a
watched pool may wait, and may be refused with that pool's own timeout exception
(``sqlalchemy.exc.TimeoutError``, asyncpg's ``TimeoutError``, psycopg_pool's
``PoolTimeout``). From there the refusal takes the road a real one takes: the
watcher counts it, the classifier calls it an outage, retries, the breaker, the
fallback and telemetry see it. Optionally the breaker is opened at once, as after
``fail_max`` outages.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import timedelta
from types import TracebackType
from typing import Any

from guardrails.guard import Guardrails
from guardrails.pools import PoolWatcher
from guardrails.pools.fault import AcquireFault
from guardrails.testing.rates import Draw, rate, seconds, seed_of

__all__ = ["DatabaseFault", "database_down", "flaky_database", "slow_database"]


class DatabaseFault:
    """Faults on a guard's watched pools while a ``with`` (or ``async with``) block runs.

    ::

        with DatabaseFault(guard, refuse=0.3, delay=0.05, seed=1):
            ...   # 30% of acquires refused, every acquire 50 ms slower

    ``target`` is a :class:`~guardrails.Guardrails` (all the pools it watches, or those
    named in ``pools``) or one watcher (what ``guard.watch_pool`` returns). Each acquire
    first waits ``delay`` seconds, then is refused with the pool's own timeout exception
    at the rate ``refuse`` (1.0: every one; drawn from ``seed``), or goes on to the real
    pool. ``open_breaker=True`` also opens the guard's breaker on entry, with its full
    ``reset_timeout`` to run, as if ``fail_max`` outages had just happened.

    Leaving the block takes the faults off: the database is back. The breaker is left
    as the outage left it and recovers the way it would (a trial after
    ``reset_timeout``, or the probe): advance its clock with
    :func:`~guardrails.testing.breaker_clock` rather than wait. Pools watched after the
    block started are not affected.
    """

    def __init__(
        self,
        target: Guardrails | PoolWatcher,
        *,
        refuse: float = 1.0,
        delay: float | timedelta = 0.0,
        open_breaker: bool = False,
        pools: Iterable[str] | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(target, Guardrails | PoolWatcher):
            raise TypeError(
                f"target must be a guardrails Guardrails or the PoolWatcher that "
                f"guard.watch_pool() returned, not {target!r}"
            )
        if open_breaker and not isinstance(target, Guardrails):
            raise TypeError("open_breaker=True needs the guard as target, not one of its watchers")
        if isinstance(pools, str):
            raise TypeError(f"pools must be a list of pool names, e.g. [{pools!r}]")
        self.target = target
        self.refuse = rate("refuse", refuse)
        """The share of acquires refused (1.0: all)."""
        self.delay = seconds("delay", delay)
        """Seconds each acquire waits before it goes on (or is refused)."""
        self.open_breaker = bool(open_breaker)
        self.pools = None if pools is None else tuple(pools)
        self._draw = Draw(seed_of(seed))
        self._lock = threading.Lock()
        self._previous: list[tuple[PoolWatcher, AcquireFault | None]] = []
        self.active = False
        """Whether the faults are on now."""
        self.acquires = 0
        """Acquires on the faulted pools while the faults were on."""
        self.refused = 0
        """How many of those were refused."""

    # -- the fault hook (called by the pool adapters) -----------------------------------

    def plan(self, watcher: PoolWatcher) -> tuple[float, bool]:
        """For one acquire: ``(seconds to wait, refused)``; counts it."""
        refused = self._draw.hit(self.refuse)
        with self._lock:
            self.acquires += 1
            if refused:
                self.refused += 1
        return self.delay, refused

    # -- on and off ----------------------------------------------------------------------

    def watchers(self) -> list[PoolWatcher]:
        """The watchers the faults go on: the target's, filtered by ``pools``."""
        target = self.target
        if isinstance(target, PoolWatcher):
            return [target]
        watched: list[PoolWatcher] = [w for w in target.watchers if not w.closed]
        if self.pools is None:
            if not watched and not self.open_breaker:
                raise ValueError(
                    "this guard watches no pool, so there is nothing to fault: call "
                    "guard.watch_pool(engine_or_pool) first, or pass open_breaker=True"
                )
            return watched
        names = {w.name for w in watched}
        unknown = sorted(set(self.pools) - names)
        if unknown:
            raise ValueError(
                f"no watched pool named {', '.join(map(repr, unknown))}: "
                f"the guard watches {sorted(names) or 'none'}"
            )
        return [w for w in watched if w.name in self.pools]

    def start(self) -> DatabaseFault:
        """Put the faults on (what entering the block does); returns ``self``."""
        if self.active:
            raise RuntimeError("this DatabaseFault is on already: start it once")
        chosen = self.watchers()
        self._previous = [(watcher, watcher.fault) for watcher in chosen]
        for watcher in chosen:
            watcher.fault = self
        self.active = True
        if self.open_breaker:
            assert isinstance(self.target, Guardrails)
            breaker = self.target.breaker
            breaker.force_open(breaker.settings.reset_timeout)
        return self

    def stop(self) -> None:
        """Take the faults off (what leaving the block does); the breaker is left alone."""
        previous, self._previous = self._previous, []
        for watcher, fault in reversed(previous):
            if watcher.fault is self:
                watcher.fault = fault
        self.active = False

    def __enter__(self) -> DatabaseFault:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> DatabaseFault:
        return self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "on" if self.active else "off"
        return (
            f"<DatabaseFault refuse={self.refuse} delay={self.delay} {state}: "
            f"{self.refused}/{self.acquires} acquires refused>"
        )


def database_down(
    target: Guardrails | PoolWatcher,
    *,
    wait: float | timedelta = 0.0,
    open_breaker: bool = False,
    pools: Iterable[str] | None = None,
) -> DatabaseFault:
    """The database is down (or the pool exhausted): every acquire is refused.

    Each acquire waits ``wait`` seconds first, as a pool with ``pool_timeout=wait``
    does when no connection comes back, then raises the pool's timeout exception.
    ``with database_down(guard): ...``; see :class:`DatabaseFault`.
    """
    return DatabaseFault(target, refuse=1.0, delay=wait, open_breaker=open_breaker, pools=pools)


def slow_database(
    target: Guardrails | PoolWatcher,
    delay: float | timedelta,
    *,
    pools: Iterable[str] | None = None,
) -> DatabaseFault:
    """Every acquire waits ``delay`` seconds, then gets its connection as usual."""
    return DatabaseFault(target, refuse=0.0, delay=delay, pools=pools)


def flaky_database(
    target: Guardrails | PoolWatcher,
    refuse: float,
    *,
    seed: int | None = None,
    delay: float | timedelta = 0.0,
    pools: Iterable[str] | None = None,
) -> DatabaseFault:
    """A share ``refuse`` of acquires is refused (drawn from ``seed``); the rest go on."""
    return DatabaseFault(target, refuse=refuse, delay=delay, pools=pools, seed=seed)
