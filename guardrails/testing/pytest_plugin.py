"""pytest fixtures for :mod:`guardrails.testing`; opt in from your ``conftest.py``::

    pytest_plugins = ["guardrails.testing.pytest_plugin"]

(or ``pytest -p guardrails.testing.pytest_plugin``). It is not registered as a
``pytest11`` entry point on purpose: an entry point is installed with the package
whatever extras are chosen, so every pytest run of every project that depends on
guardrails would import it. Opt-in changes nothing for anyone who does not ask.

- ``guardrails_outage(guard, **faults)``: starts a :class:`~guardrails.testing.DatabaseFault`;
- ``guardrails_instant_retries``: retries do not sleep during the test;
- ``guardrails_clock(guard)``: the guard's breaker runs on a
  :class:`~guardrails.testing.ManualClock`.

Everything is undone at teardown, and a breaker that was closed when an outage began
is closed again, so a guard shared between tests (an app's module-level guard) starts
the next test as the last one found it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from datetime import timedelta
from typing import Protocol

import pytest

from guardrails.breaker import CLOSED, Breaker
from guardrails.guard import Guardrails
from guardrails.pools import PoolWatcher
from guardrails.testing.clock import ManualClock, breaker_clock
from guardrails.testing.database import DatabaseFault
from guardrails.testing.retries import InstantRetries, instant_retries

__all__ = ["guardrails_clock", "guardrails_instant_retries", "guardrails_outage"]


class StartOutage(Protocol):
    """What the ``guardrails_outage`` fixture is: starts a fault, returns it."""

    def __call__(
        self,
        target: Guardrails | PoolWatcher,
        *,
        refuse: float = ...,
        delay: float | timedelta = ...,
        open_breaker: bool = ...,
        pools: Iterable[str] | None = ...,
        seed: int | None = ...,
    ) -> DatabaseFault:
        """Start a :class:`~guardrails.testing.DatabaseFault` (every acquire refused by
        default); it stops at teardown, or earlier with ``.stop()``."""
        ...


class UseClock(Protocol):
    """What the ``guardrails_clock`` fixture is: puts a manual clock on a breaker."""

    def __call__(self, target: Guardrails | Breaker) -> ManualClock:
        """Run ``target``'s breaker on a new :class:`~guardrails.testing.ManualClock`
        until teardown; returns the clock."""
        ...


@pytest.fixture
def guardrails_outage() -> Iterator[StartOutage]:
    """Start database outages: ``fault = guardrails_outage(guard)``; over at teardown."""
    started: list[DatabaseFault] = []
    closed: list[Breaker] = []

    def start(
        target: Guardrails | PoolWatcher,
        *,
        refuse: float = 1.0,
        delay: float | timedelta = 0.0,
        open_breaker: bool = False,
        pools: Iterable[str] | None = None,
        seed: int | None = None,
    ) -> DatabaseFault:
        fault = DatabaseFault(
            target, refuse=refuse, delay=delay, open_breaker=open_breaker, pools=pools, seed=seed
        )
        guard = target if isinstance(target, Guardrails) else target.sink
        if isinstance(guard, Guardrails) and guard.breaker.state is CLOSED:
            closed.append(guard.breaker)  # a watcher's sink is the guard that watches it
        started.append(fault.start())
        return fault

    try:
        yield start
    finally:
        for fault in reversed(started):
            fault.stop()
        for breaker in closed:
            breaker.force_close()
            if breaker.failures:
                breaker.record(None)  # a success: the count of outages starts again at 0


@pytest.fixture
def guardrails_instant_retries() -> Iterator[InstantRetries]:
    """Retries and their backoff do not sleep during the test; ``.waits`` lists the waits."""
    with instant_retries() as retries:
        yield retries


@pytest.fixture
def guardrails_clock() -> Iterator[UseClock]:
    """``clock = guardrails_clock(guard)``: read and advance the breaker's time."""
    with ExitStack() as stack:

        def use(target: Guardrails | Breaker) -> ManualClock:
            return stack.enter_context(breaker_clock(target))

        yield use
