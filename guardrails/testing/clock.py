"""A clock that moves only when told: read and advance a breaker's time in tests.

The breaker measures its open period on a monotonic clock
(:attr:`Breaker.clock <guardrails.Breaker.clock>`). :func:`breaker_clock` puts a
:class:`ManualClock` there for a block, so a test can step over ``reset_timeout``
instead of sleeping through it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from guardrails.breaker import Breaker
from guardrails.guard import Guardrails
from guardrails.testing.rates import seconds

__all__ = ["ManualClock", "breaker_clock"]


class ManualClock:
    """A monotonic clock for tests: ``clock()`` reads it, :meth:`advance` moves it.

    ``start`` is the first reading (seconds, any origin).
    """

    __slots__ = ("_lock", "_now")

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """The time now, in seconds."""
        return self._now

    def now(self) -> float:
        """The time now, in seconds (the same as calling the clock)."""
        return self._now

    def advance(self, by: float | timedelta) -> float:
        """Move the clock forward by ``by`` seconds; returns the new time."""
        step = seconds("by", by)
        with self._lock:
            self._now += step
            return self._now

    def __repr__(self) -> str:
        return f"<ManualClock {self._now:.3f}>"


@contextmanager
def breaker_clock(target: Guardrails | Breaker) -> Iterator[ManualClock]:
    """Run ``target``'s breaker on a :class:`ManualClock` for the block; yields the clock.

    ::

        with breaker_clock(guard) as clock:
            ...                                   # an outage opens the breaker
            clock.advance(guard.breaker.settings.reset_timeout)
            ...                                   # the next call is the half-open trial

    The clock starts at the breaker's current reading, so an open period under way
    goes on; the breaker's own clock is put back when the block ends (time advanced
    here is not carried over). A configured probe still sleeps ``probe_interval`` in
    real time between its runs.
    """
    if isinstance(target, Guardrails):
        breaker = target.breaker
    elif isinstance(target, Breaker):
        breaker = target
    else:
        raise TypeError(f"target must be a guardrails Guardrails or Breaker, not {target!r}")
    previous = breaker.clock
    clock = ManualClock(previous())
    breaker.clock = clock
    try:
        yield clock
    finally:
        if breaker.clock is clock:
            breaker.clock = previous
