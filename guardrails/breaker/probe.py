"""The probe's cadence: while the breaker is open, test recovery every ``probe_interval``.

With ``BreakerSettings(probe=...)`` no user request is spent on a trial: the probe
(e.g. ``SELECT 1``) runs every ``probe_interval`` while the breaker is open and closes
it as soon as it succeeds, whatever ``reset_timeout`` says. :meth:`ProbeLoop.run` is the
loop (``Breaker.run_probe``); the guard's background task group runs it, and the breaker
starts it on its own asyncio loop when nothing else does. Where no probe can run (no
loop of its own, e.g. trio without the guard's lifespan), user requests are the trials
again. Each probe run is the breaker's half-open trial; the breaker runs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from guardrails.breaker.settings import BreakerSettings, Probe
from guardrails.breaker.state import OPEN, BreakerState

__all__ = ["ProbeLoop", "Probed"]


class Probed(Protocol):
    """What the probe loop reads of the breaker it tests recovery for."""

    name: str
    settings: BreakerSettings
    state: BreakerState
    hold: bool

    @property
    def clock(self) -> Callable[[], float]: ...


class ProbeLoop:
    """Runs one breaker's probe while it is open; ``trial(probe)`` runs one probe as the
    breaker's half-open trial and records its outcome."""

    def __init__(self, breaker: Probed, trial: Callable[[Probe], Awaitable[None]]) -> None:
        self._breaker = breaker
        self._trial = trial
        self.due = 0.0
        """When the next probe may run, on the breaker's clock."""
        self._runners = 0
        self._own: asyncio.Task[None] | None = None
        self._wake: anyio.Event | None = None

    @property
    def running(self) -> bool:
        """Whether a loop runs (so users are never trials); False without a probe."""
        if self._breaker.settings.probe is None:
            return False
        own = self._own
        return self._runners > 0 or (own is not None and not own.done())

    def opened(self, at: float) -> None:
        """The breaker opened at ``at``: the first probe is due one interval later."""
        self.due = at + self._breaker.settings.probe_interval
        if self._breaker.settings.probe is not None:
            wake, self._wake = self._wake, None
            if wake is not None:
                wake.set()
            self.start_own()

    async def run(self) -> None:
        """Probe every ``probe_interval`` while open, until cancelled; returns at once
        if no probe is configured."""
        breaker = self._breaker
        probe = breaker.settings.probe
        if probe is None:
            return
        self._runners += 1
        try:
            while True:
                if breaker.state is not OPEN:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                wait = self.due - breaker.clock()
                if wait > 0:
                    await anyio.sleep(wait)
                elif breaker.hold:
                    # Another process tests recovery for the fleet.
                    await anyio.sleep(breaker.settings.probe_interval)
                else:
                    await self._trial(probe)
        finally:
            self._runners -= 1

    def start_own(self) -> None:
        """Start the loop on the running asyncio loop, unless one runs already."""
        if self.running:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not asyncio (or no loop): user requests are the trials
        self._own = loop.create_task(self.run(), name=f"guardrails-probe-{self._breaker.name}")

    async def aclose(self) -> None:
        """Stop the loop :meth:`start_own` started, if any."""
        task, self._own = self._own, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
