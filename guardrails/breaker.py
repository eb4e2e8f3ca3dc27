"""The circuit breaker in front of the database: stop calling a pool that cannot serve.

State is kept by :mod:`pybreaker` (closed, open, half-open; the consecutive failure
count); this module drives it from asyncio, where pybreaker's own async support does
not fit:

- ``CircuitBreaker.call_async`` needs tornado, and ``call(async_fn)`` records a
  success when the coroutine is *created*, before it runs. So the guarded call is
  awaited here, and only its *outcome* is handed to pybreaker, through ``call`` with a
  synchronous function that returns (success) or re-raises the outage (failure).
  That call never blocks: the default in-memory storage and an uncontended lock.
- pybreaker counts every exception, cancellation included, unless excluded, and
  counts excluded ones as successes. Here an outcome is classified first
  (:func:`guardrails.errors.classify`): only outages reach pybreaker as failures;
  the app's own errors and transient errors mean the database answered (a success);
  cancellation records nothing.
- pybreaker lets every concurrent caller through in half-open. Here one trial at a
  time is admitted (the caller holding the :class:`Trial`); the others get
  :class:`~guardrails.errors.Unavailable` at once.
- pybreaker keeps ``opened_at`` as wall-clock time inside its storage. The open
  period is measured here on a monotonic clock, and the move to half-open is made
  explicitly, so a clock jump cannot shorten or stretch it.

With ``BreakerSettings(probe=...)`` no user request is spent on a trial: when the
open period ends the breaker runs the probe itself (e.g. ``SELECT 1`` with a short
timeout), closes as soon as it succeeds, and opens for another period if it fails.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NoReturn

import pybreaker

from guardrails.errors import Classifier, ErrorKind, Unavailable, classify

__all__ = ["Breaker", "BreakerSettings", "Trial"]

logger = logging.getLogger("guardrails.breaker")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
_STATE_NAMES = {
    pybreaker.STATE_CLOSED: CLOSED,
    pybreaker.STATE_OPEN: OPEN,
    pybreaker.STATE_HALF_OPEN: HALF_OPEN,
}

Probe = Callable[[], Awaitable[object]]
"""An async callable that succeeds when the database can serve again."""


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """How the breaker decides that the database is down, and how it tests recovery.

    ``fail_max`` consecutive outages (pool timeouts, refused or dropped connections,
    ``too many connections``) open it; after ``reset_timeout`` seconds one trial call
    is let through (half-open), which closes it on success and opens it again on
    failure. ``probe``, an async callable such as ``lambda: ping(engine)``, makes the
    breaker run that trial itself instead of spending a user request on it; each
    probe run is cut off after ``probe_timeout`` seconds. ``classifiers`` are extra
    rules for :func:`guardrails.errors.classify`.
    """

    fail_max: int = 5
    reset_timeout: float = 30.0
    probe: Probe | None = None
    probe_timeout: float = 2.0
    classifiers: tuple[Classifier, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.fail_max, bool) or not isinstance(self.fail_max, int):
            raise TypeError(f"fail_max must be a whole number, not {self.fail_max!r}")
        if self.fail_max < 1:
            raise ValueError(
                f"fail_max must be >= 1, not {self.fail_max}: it is how many outages in a "
                "row open the breaker (5 is a common choice)"
            )
        for name in ("reset_timeout", "probe_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number of seconds, not {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.probe is not None and not callable(self.probe):
            raise TypeError(
                f"probe must be an async callable taking no arguments, not {self.probe!r}"
            )
        object.__setattr__(self, "classifiers", tuple(self.classifiers))


StateListener = Callable[[str | None, str, dict[str, Any]], None]
"""Hears a breaker transition as ``(old, new, snapshot)``; must not block or raise."""


_UNPROVEN_TRIALS_TRUSTED = 3
"""Half-open trials in a row that succeed without a watched checkout before one counts."""


class Trial:
    """The right to make the one half-open trial call; given back by recording its outcome."""

    __slots__ = ("breaker", "done")

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        self.done = False


class _Outage(Exception):
    """Stands in for an outage when its outcome is handed to pybreaker."""


def _succeed() -> None:
    return None


def _fail(exc: BaseException) -> NoReturn:
    raise exc


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = _STATE_NAMES.get(str(getattr(old_state, "name", "")))
        self.breaker._on_state_change(old, _STATE_NAMES[new_state.name])


class Breaker:
    """A circuit breaker for one database, driven from asyncio.

    Callers ask :meth:`admit` before touching the pool and report the outcome with
    :meth:`record`; :meth:`call` does both around one awaitable. The ``on_change``
    callback, and every listener added with :meth:`add_listener`, hears every
    transition as ``(old, new, snapshot)``.
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
        self._on_change = on_change
        self._listeners: list[StateListener] = []
        self._clock = clock
        self.state = CLOSED
        """``"closed"``, ``"open"`` or ``"half_open"``; kept in step with pybreaker."""
        self._opened_at: float | None = None
        self._opened_wall: datetime | None = None
        self._trial: Trial | None = None
        self._unproven = 0
        self._probe_task: asyncio.Task[None] | None = None
        self.transitions = 0
        """Number of state changes since the breaker was made."""
        self.counting = False
        """Whether outages may have been counted since the last success (cheap to read)."""
        self.hold = False
        """While True, an open breaker stays open past ``reset_timeout``: no trial, no
        probe. A coordinator sets it so that one process of many tests recovery."""
        self._cb = pybreaker.CircuitBreaker(
            fail_max=self.settings.fail_max,
            reset_timeout=self.settings.reset_timeout,
            throw_new_error_on_trip=False,
            listeners=[_Listener(self)],
            name=name,
        )

    # -- admission ---------------------------------------------------------------------

    @property
    def failures(self) -> int:
        """Consecutive outages counted so far (reset by any success)."""
        return int(self._cb.fail_counter)

    @property
    def retry_after(self) -> int:
        """Whole seconds a client should wait before trying again; 0 while closed."""
        if self.state == CLOSED:
            return 0
        if self.state == HALF_OPEN or self._opened_at is None:
            return 1
        left = self._opened_at + self.settings.reset_timeout - self._clock()
        return max(1, math.ceil(left))

    def rejects(self) -> bool:
        """Whether a call now would be refused without trying: the cheap check for requests.

        True while open (before the trial is due) or while a half-open trial or probe
        is running.
        """
        if self.state == CLOSED:
            return False
        if self.state == HALF_OPEN:
            return self._trial is not None or self._probe_task is not None
        if self.settings.probe is not None:
            self._start_probe()  # normally already running; not if opened from sync code
            return True
        return not self._trial_due()

    def admit(self) -> Trial | None:
        """Let a call through, or raise :class:`~guardrails.errors.Unavailable`.

        Returns ``None`` while closed. When open and the open period is over (without a
        probe), or half-open with no trial running, returns the :class:`Trial` the caller
        must hand back to :meth:`record`. Never touches the pool.
        """
        if self.state == CLOSED:
            return None
        if self.state == OPEN:
            if self.settings.probe is not None:
                self._start_probe()
                self._unavailable()
            if not self._trial_due():
                self._unavailable()
            self._cb.half_open()
        if self._trial is not None or self._probe_task is not None:
            self._unavailable()
        self._trial = Trial(self)
        return self._trial

    def record(self, trial: Trial | None, exc: BaseException | None = None) -> ErrorKind | None:
        """Record how a call admitted by :meth:`admit` ended; returns the kind of ``exc``.

        ``exc=None`` is a success. An outage counts toward opening (or re-opens from
        half-open); the app's own and transient errors count as successes, since the
        database answered; cancellation records nothing and gives the trial back
        undecided. Outcomes of calls admitted while closed that end after the breaker
        opened are ignored: they describe the past.
        """
        kind = None if exc is None else classify(exc, self.settings.classifiers)
        if trial is not None:
            if trial.done:
                return kind
            trial.done = True
            if self._trial is trial:
                self._trial = None
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                return kind
            if self.state != HALF_OPEN:
                return kind
        elif self.state != CLOSED:
            return kind
        elif exc is None and not self.counting:
            return kind  # the hot path: closed, nothing to reset
        elif isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
            return kind
        self._feed(kind is ErrorKind.OUTAGE, exc)
        return kind

    def release(self, trial: Trial | None) -> None:
        """Give a trial back undecided (the call never reached the database)."""
        if trial is not None and not trial.done:
            trial.done = True
            if self._trial is trial:
                self._trial = None

    def record_outage(self, exc: BaseException) -> None:
        """Count an outage seen outside any admitted call (e.g. by a pool watcher)."""
        if self.state == CLOSED:
            self._feed(True, exc)

    async def call(self, func: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``func()`` if the breaker lets it through, and record its outcome."""
        trial = self.admit()
        try:
            result = await func()
        except BaseException as exc:
            self.record(trial, exc)
            raise
        self.record(trial)
        return result

    # -- state -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """State, failure count, opened-at, retry_after and settings as plain data."""
        return {
            "state": self.state,
            "failures": self.failures,
            "fail_max": self.settings.fail_max,
            "reset_timeout": self.settings.reset_timeout,
            "retry_after": self.retry_after,
            "opened_at": self._opened_wall.isoformat() if self._opened_wall else None,
            "trial_in_flight": self._trial is not None or self._probe_task is not None,
            "probe": self.settings.probe is not None,
            "transitions": self.transitions,
        }

    async def aclose(self) -> None:
        """Stop a probe that is waiting or running."""
        task, self._probe_task = self._probe_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _feed(self, failed: bool, exc: BaseException | None) -> None:
        # pybreaker raises the failure back at us: hand it a stand-in, so the caller's
        # own exception keeps its traceback free of pybreaker's frames.
        try:
            if failed:
                self._cb.call(_fail, _Outage(type(exc).__name__ if exc else "outage"))
            else:
                self._cb.call(_succeed)
        except _Outage:
            pass
        self.counting = self.state != CLOSED or bool(self._cb.fail_counter)

    def _trial_due(self) -> bool:
        if self.hold:
            return False
        opened = self._opened_at
        return opened is None or self._clock() >= opened + self.settings.reset_timeout

    def force_open(self, remaining: float) -> None:
        """Open now (if not open) with ``remaining`` seconds left of the open period.

        For coordinators: another process opened its breaker for the same database.
        """
        if self.state != OPEN:
            self._cb.open()
        self._opened_at = self._clock() - self.settings.reset_timeout + max(0.0, remaining)

    def force_close(self) -> None:
        """Close now (if not closed): another process's trial found the database back."""
        if self.state != CLOSED:
            self._drop_trial()
            self._cb.close()

    def opened_remaining(self) -> float:
        """Seconds left of the open period (0 unless open)."""
        if self.state != OPEN or self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.settings.reset_timeout - self._clock())

    def unavailable(self) -> Unavailable:
        """The exception a refused call gets: says the state, carries ``retry_after``."""
        return Unavailable(
            f"the {self.name} circuit breaker is {self.state.replace('_', '-')}",
            retry_after=self.retry_after,
        )

    def _unavailable(self) -> NoReturn:
        raise self.unavailable()

    def trust_unproven(self) -> bool:
        """Whether a half-open trial that succeeded without visibly reaching the database
        (no watched checkout) may close the breaker: the third such in a row may.

        A watched pool is not always where the app's queries run (another pool, a worker
        thread that does not carry the request's context): the breaker must not stay
        half-open for good. A 404 or a page without queries is trusted no sooner.
        """
        self._unproven += 1
        if self._unproven < _UNPROVEN_TRIALS_TRUSTED:
            return False
        self._unproven = 0
        return True

    def _drop_trial(self) -> None:
        # The state moved on without the trial's verdict (another process, the probe):
        # its holder must not go on to the pool as if it still held the right to try.
        trial, self._trial = self._trial, None
        if trial is not None:
            trial.done = True

    def _on_state_change(self, old: str | None, new: str) -> None:
        self.state = new
        self.transitions += 1
        if new != HALF_OPEN:
            self._unproven = 0
        if new == OPEN:
            self._opened_at = self._clock()
            self._opened_wall = datetime.now(timezone.utc)
            self._drop_trial()
            if self.settings.probe is not None:
                self._start_probe()
        elif new == CLOSED:
            self._opened_at = None
            self._opened_wall = None
            self._drop_trial()
        snapshot = self.snapshot()
        level = logging.WARNING if new == OPEN else logging.INFO
        logger.log(
            level,
            "%s circuit breaker %s -> %s (failures %d, retry after %ds)",
            self.name,
            old or "?",
            new,
            snapshot["failures"],
            snapshot["retry_after"],
            extra={"guardrails": {"event": "breaker_state", "old": old, **snapshot}},
        )
        if self._on_change is not None:
            try:
                self._on_change(old, new, snapshot)
            except Exception:
                logger.exception("%s breaker on_change callback failed", self.name)
        for listener in tuple(self._listeners):
            try:
                listener(old, new, snapshot)
            except Exception:
                # A listener's bug must not undo a transition already made.
                logger.exception("%s breaker listener %r failed", self.name, listener)

    def add_listener(self, listener: StateListener) -> None:
        """Also call ``listener(old, new, snapshot)`` on every transition (e.g. a coordinator)."""
        if not callable(listener):
            raise TypeError(f"listener must be a callable (old, new, snapshot), not {listener!r}")
        self._listeners.append(listener)

    def remove_listener(self, listener: StateListener) -> None:
        """Stop calling ``listener``; no error if it was not added."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    # -- active probe ------------------------------------------------------------------

    def _start_probe(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # opened from sync code: the next call in async code starts it
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = loop.create_task(self._probe_loop(), name="guardrails-probe")

    async def _probe_loop(self) -> None:
        probe = self.settings.probe
        assert probe is not None
        try:
            while self.state == OPEN:
                assert self._opened_at is not None
                due = self._opened_at + self.settings.reset_timeout
                await asyncio.sleep(max(0.0, due - self._clock()))
                if self.state != OPEN:
                    return
                if self.hold or not self._trial_due():
                    await asyncio.sleep(0.05)  # another process tests, or the period moved
                    continue
                self._cb.half_open()
                outcome: BaseException | None = None
                try:
                    await asyncio.wait_for(probe(), self.settings.probe_timeout)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    outcome = exc
                # Any probe failure counts: it exists only to answer "is it back?".
                self._feed(outcome is not None, outcome)
                if outcome is not None:
                    logger.info("%s breaker probe failed: %s", self.name, type(outcome).__name__)
        finally:
            if self._probe_task is asyncio.current_task():
                self._probe_task = None
