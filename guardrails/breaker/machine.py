"""The circuit breaker's state machine: stop calling a pool that cannot serve.

An explicit state machine; pybreaker (behind :mod:`guardrails.breaker._pybreaker`)
keeps the state and the consecutive failure count::

    closed    --fail_max outages in a row------------------------------> open
    open      --reset_timeout over, a caller is admitted (no probe)-----> half_open
    open      --probe_interval over, the probe starts (probe running)---> half_open
    half_open --the trial succeeds (the database answered)--------------> closed
    half_open --the trial fails with an outage--------------------------> open
    half_open --the trial is cancelled or given back undecided----------> half_open
    any       --force_open / force_close (a coordinator)----------------> open / closed

Only one trial runs at a time: the caller holding the :class:`Trial`, or the probe;
everyone else is refused with :class:`~guardrails.errors.Unavailable` at once. The
open period is measured on a monotonic clock, so a wall-clock jump cannot shorten it.

Outcomes are classified first (:func:`guardrails.errors.classify`): only outages count
as failures, the app's own errors mean the database answered, and cancellation records
nothing. With a probe (:mod:`guardrails.breaker.probe`) no user request is a trial.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import anyio

from guardrails.breaker._pybreaker import Circuit
from guardrails.breaker.probe import ProbeLoop
from guardrails.breaker.settings import BreakerSettings, Probe
from guardrails.breaker.state import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Announcer,
    BreakerState,
    StateListener,
    outage_record,
)
from guardrails.errors import ErrorKind, Unavailable, classify

__all__ = ["Breaker", "Trial"]

logger = logging.getLogger("guardrails.breaker")

_UNPROVEN_TRIALS_TRUSTED = 3
"""Half-open trials in a row that succeed without a watched checkout before one counts."""


class Trial:
    """The right to make the one half-open trial call; given back by recording its outcome."""

    __slots__ = ("breaker", "done")

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        self.done = False


_STOPPING = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


class Breaker:
    """A circuit breaker for one database (or one remote origin), driven from async code.

    Callers ask :meth:`admit` before touching the pool and report the outcome with
    :meth:`record` (or give a trial back undecided with :meth:`release`). The
    ``on_change`` callback, and every listener added with :meth:`add_listener`,
    hears every transition as ``(old, new, snapshot)``.
    """

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        *,
        name: str = "database",
        on_change: StateListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings if settings is not None else BreakerSettings()
        if not isinstance(self.settings, BreakerSettings):
            raise TypeError(f"breaker must be a BreakerSettings, not {settings!r}")
        self.name = name
        self._announcer = Announcer(on_change)
        self._clock = clock
        self.state: BreakerState = CLOSED
        """``"closed"``, ``"open"`` or ``"half_open"`` (a :class:`BreakerState`)."""
        self._opened_at: float | None = None
        self._opened_wall: datetime | None = None
        self._trial: Trial | None = None
        self._unproven = 0
        self.transitions = 0
        """Number of state changes since the breaker was made."""
        self.last_outage: dict[str, Any] | None = None
        """The last outage counted: ``error`` (its type), ``route``, ``pool``, ``probe``
        (whether the recovery probe met it) and ``at``; ``None`` before the first."""
        self.opened_by: dict[str, Any] | None = None
        """The outage that opened the breaker (as :attr:`last_outage`), while it is not
        closed; ``None`` when closed or opened by a coordinator."""
        self._feeding = False
        self.refused_total = 0
        """Calls refused while open or half-open (each :meth:`unavailable` made)."""
        self.counting = False
        """Whether outages may have been counted since the last success (cheap to read)."""
        self.hold = False
        """While True, an open breaker stays open past ``reset_timeout``: no trial, no
        probe. A coordinator sets it so that one process of many tests recovery."""
        self._probe = ProbeLoop(self, self._probe_once)
        self._circuit = Circuit(
            fail_max=self.settings.fail_max,
            reset_timeout=self.settings.reset_timeout,
            name=name,
            moved=self._moved,
        )

    # -- admission ---------------------------------------------------------------------

    @property
    def clock(self) -> Callable[[], float]:
        """The monotonic clock the open period is measured on (``time.monotonic``).

        A test may set another, e.g. :class:`guardrails.testing.ManualClock`, to read
        and advance the breaker's time; it should continue from the current reading.
        """
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, not {clock!r}")
        self._clock = clock

    @property
    def failures(self) -> int:
        """Consecutive outages counted so far (reset by any success)."""
        return self._circuit.failures

    @property
    def probing(self) -> bool:
        """Whether a probe loop is running to test recovery (so users are never trials)."""
        return self._probe.running

    @property
    def retry_after(self) -> int:
        """Whole seconds a client should wait before trying again; 0 while closed."""
        if self.state is CLOSED:
            return 0
        if self.state is HALF_OPEN or self._opened_at is None:
            return 1
        due = self._probe.due if self.probing else self._opened_at + self.settings.reset_timeout
        return max(1, math.ceil(due - self._clock()))

    def admit(self) -> Trial | None:
        """Let a call through, or raise :class:`~guardrails.errors.Unavailable`.

        Returns ``None`` while closed. When open and the open period is over (and no
        probe tests recovery), or half-open with no trial running, returns the
        :class:`Trial` the caller must hand back to :meth:`record` or :meth:`release`.
        Never touches the pool.
        """
        if self.state is CLOSED:
            return None
        if self.state is OPEN:
            if self.settings.probe is not None:
                self._probe.start_own()
                if self.probing:
                    raise self.unavailable()
            if not self._trial_due():
                raise self.unavailable()
            self._circuit.half_open()
        if self._trial is not None:
            raise self.unavailable()
        self._trial = Trial(self)
        return self._trial

    def record(
        self,
        trial: Trial | None,
        exc: BaseException | None = None,
        *,
        route: str | None = None,
        pool: str | None = None,
    ) -> ErrorKind | None:
        """Record how a call admitted by :meth:`admit` ended; returns the kind of ``exc``.

        ``exc=None`` is a success. An outage counts toward opening (or re-opens from
        half-open); the app's own and transient errors count as successes, since the
        database answered; cancellation records nothing and gives the trial back
        undecided. Outcomes of calls admitted while closed that end after the breaker
        opened are ignored: they describe the past. ``route`` and ``pool`` say where an
        outage was seen; they are kept as :attr:`last_outage` and name what opened it.
        """
        kind = None if exc is None else classify(exc, self.settings.classifiers)
        if trial is not None:
            if trial.done:
                return kind
            self._end(trial)
            if isinstance(exc, _STOPPING) or self.state is not HALF_OPEN:
                return kind
        elif self.state is not CLOSED:
            return kind
        elif exc is None and not self.counting:
            return kind  # the hot path: closed, nothing to reset
        elif isinstance(exc, _STOPPING):
            return kind
        self._feed(kind is ErrorKind.OUTAGE, exc, route, pool)
        return kind

    def record_unproven(self, trial: Trial | None) -> None:
        """Record a success that was not seen to reach the database (no watched checkout).

        A 404 or a page without queries proves nothing: it neither resets the count nor
        closes a half-open breaker, and its trial goes back undecided. The third such
        trial in a row does close it: a watched pool is not always where the app's
        queries run, and the breaker must not stay half-open for good.
        """
        if trial is None or trial.done:
            return
        self._unproven += 1
        if self._unproven < _UNPROVEN_TRIALS_TRUSTED:
            self.release(trial)
            return
        self._unproven = 0
        self.record(trial)

    def release(self, trial: Trial | None) -> None:
        """Give a trial back undecided (the call never reached the database)."""
        if trial is not None and not trial.done:
            self._end(trial)

    def record_outage(
        self, exc: BaseException, *, route: str | None = None, pool: str | None = None
    ) -> None:
        """Count an outage seen outside any admitted call (e.g. by a pool watcher)."""
        if self.state is CLOSED:
            self._feed(True, exc, route, pool)

    def unavailable(self) -> Unavailable:
        """The exception a refused call gets: says the state, carries ``retry_after``."""
        self.refused_total += 1
        return Unavailable(
            f"the {self.name} circuit breaker is {self.state.value.replace('_', '-')}",
            retry_after=self.retry_after,
        )

    # -- coordination ------------------------------------------------------------------

    def force_open(self, remaining: float) -> None:
        """Open now (if not open) with ``remaining`` seconds left of the open period.

        For coordinators: another process opened its breaker for the same database.
        """
        if self.state is not OPEN:
            self._circuit.open()
        self._opened_at = self._clock() - self.settings.reset_timeout + max(0.0, remaining)

    def force_close(self) -> None:
        """Close now (if not closed): another process's trial found the database back."""
        if self.state is not CLOSED:
            self._drop_trial()
            self._circuit.close()

    def opened_remaining(self) -> float:
        """Seconds left of the open period (0 unless open)."""
        if self.state is not OPEN or self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.settings.reset_timeout - self._clock())

    def add_listener(self, listener: StateListener) -> None:
        """Also call ``listener(old, new, snapshot)`` on every transition (e.g. a coordinator)."""
        self._announcer.add(listener)

    def remove_listener(self, listener: StateListener) -> None:
        """Stop calling ``listener``; no error if it was not added."""
        self._announcer.remove(listener)

    def snapshot(self) -> dict[str, Any]:
        """State, failure count, opened-at, retry_after and settings as plain data."""
        return {
            "state": self.state.value,
            "failures": self.failures,
            "fail_max": self.settings.fail_max,
            "reset_timeout": self.settings.reset_timeout,
            "retry_after": self.retry_after,
            "opened_at": self._opened_wall.isoformat() if self._opened_wall else None,
            "opened_by": self.opened_by,
            "last_outage": self.last_outage,
            "trial_in_flight": self._trial is not None,
            "probe": self.settings.probe is not None,
            "probe_interval": self.settings.probe_interval,
            "probing": self.probing,
            "transitions": self.transitions,
            "refused_total": self.refused_total,
        }

    # -- the probe ---------------------------------------------------------------------

    async def run_probe(self) -> None:
        """Test recovery with the probe every ``probe_interval`` while open; runs until
        cancelled. Returns at once if no probe is configured.

        The guard's background task group runs it (``async with guard`` or
        ``guard.lifespan``); under asyncio the breaker also starts it itself when it
        opens with nothing else running it.
        """
        await self._probe.run()

    async def _probe_once(self, probe: Probe) -> None:
        # One probe run is the half-open trial; the loop in probe.py decides when.
        self._circuit.half_open()
        trial = self._trial = Trial(self)
        outcome: BaseException | None = None
        try:
            with anyio.fail_after(self.settings.probe_timeout):
                await probe()
        except Exception as exc:
            outcome = exc
        except BaseException:
            self.release(trial)
            raise
        if trial.done:
            return  # the state moved on while it ran (a coordinator closed or reopened it)
        self._end(trial)
        # Any probe failure counts: the probe exists only to answer "is it back?".
        self._feed(outcome is not None, outcome, probe=True)
        if outcome is not None:
            logger.info("%s breaker probe failed: %s", self.name, type(outcome).__name__)

    async def aclose(self) -> None:
        """Stop the probe the breaker started itself, if any."""
        await self._probe.aclose()

    # -- transitions -------------------------------------------------------------------

    def _trial_due(self) -> bool:
        if self.hold:
            return False
        opened = self._opened_at
        return opened is None or self._clock() >= opened + self.settings.reset_timeout

    def _end(self, trial: Trial) -> None:
        trial.done = True
        if self._trial is trial:
            self._trial = None

    def _feed(
        self,
        failed: bool,
        exc: BaseException | None,
        route: str | None = None,
        pool: str | None = None,
        *,
        probe: bool = False,
    ) -> None:
        try:
            if failed:
                self.last_outage = outage_record(exc, route, pool, probe)
                self._feeding = True  # a transition now was caused by this outage
                self._circuit.failed(self.last_outage["error"])
            else:
                self._circuit.succeeded()
        finally:
            self._feeding = False
        self.counting = self.state is not CLOSED or bool(self._circuit.failures)

    def _drop_trial(self) -> None:
        # The state moved on without the trial's verdict (another process, the probe):
        # its holder must not go on to the pool as if it still held the right to try.
        trial, self._trial = self._trial, None
        if trial is not None:
            trial.done = True

    def _moved(self, old: BreakerState | None, new: BreakerState) -> None:
        self.state = new
        self.transitions += 1
        if new is not HALF_OPEN:
            self._unproven = 0
        if new is OPEN:
            self.opened_by = self.last_outage if self._feeding else None
            self._opened_at = self._clock()
            self._opened_wall = datetime.now(timezone.utc)
            self._drop_trial()
            self._probe.opened(self._opened_at)
        elif new is CLOSED:
            self.opened_by = None
            self._opened_at = None
            self._opened_wall = None
            self._drop_trial()
        self._announcer.announce(self.name, old, new, self.snapshot(), self.opened_by)
