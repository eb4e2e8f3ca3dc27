"""Retries for idempotent reads: few, jittered, inside the deadline and a retry budget.

The retry loop is :mod:`tenacity`'s: one ``AsyncRetrying`` per call (its state is per
call, so it is never shared between concurrent calls), exponential backoff with full
jitter (``wait_random_exponential``), ``stop_after_attempt`` and ``stop_before_delay``
(which stops *before* a sleep that would overrun the time left, where
``stop_after_delay`` would overshoot it). Retries are counted in a hook, not through
tenacity's ``statistics``, which are shared by every call of a decorated function.

What tenacity does not have is a retry *budget*: :class:`RetryBudget` allows retries
only while they stay below ``budget_ratio`` of the calls made over a sliding window,
plus a small floor so that a quiet app can still retry. A failing database then sees
at most about ``(1 + budget_ratio)`` times the normal call rate, never ``attempts``
times.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from guardrails.errors import ErrorKind, GuardrailsError

__all__ = ["RetryBudget", "RetrySettings", "backoff", "retrying", "set_backoff"]

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[object]]
"""An async function that waits a number of seconds, like ``anyio.sleep``."""

_sleep: Sleep = anyio.sleep


async def backoff(seconds: float) -> None:
    """Wait ``seconds`` before a retry: how ``guard.read`` and ``GuardedTransport`` sleep."""
    await _sleep(seconds)


def set_backoff(sleep: Sleep | None) -> Sleep:
    """Make every retry wait with ``sleep`` (``None``: ``anyio.sleep`` again).

    Returns the function used until now, to restore it. For tests:
    :func:`guardrails.testing.instant_retries` is the friendly way to use it.
    """
    global _sleep
    if sleep is not None and not callable(sleep):
        raise TypeError(f"sleep must be an async function of seconds or None, not {sleep!r}")
    previous, _sleep = _sleep, sleep if sleep is not None else anyio.sleep
    return previous


def _seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """How ``guard.read`` retries a read that failed on an outage or a transient error.

    At most ``attempts`` tries in all (1 disables retries). Before try *n* + 1 it
    sleeps a random time between 0 and ``min(max_delay, base_delay x 2**(n - 1))``
    (full jitter). Retries are allowed while they are below ``budget_ratio`` of the
    calls of the last ``budget_window`` seconds, plus ``budget_min_retries`` per
    window. A retry never sleeps past the request's deadline.
    """

    attempts: int = 3
    base_delay: float = 0.05
    max_delay: float = 1.0
    budget_ratio: float = 0.1
    budget_window: float = 10.0
    budget_min_retries: int = 10

    def __post_init__(self) -> None:
        for name in ("attempts", "budget_min_retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a whole number, not {value!r}")
        if self.attempts < 1:
            raise ValueError(
                f"attempts must be >= 1 (1 means no retries), not {self.attempts}; "
                "3 is a common choice"
            )
        if self.budget_min_retries < 0:
            raise ValueError(f"budget_min_retries must be >= 0, not {self.budget_min_retries}")
        _seconds("base_delay", self.base_delay)
        _seconds("max_delay", self.max_delay)
        _seconds("budget_window", self.budget_window)
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay ({self.max_delay}) must be >= base_delay ({self.base_delay})"
            )
        ratio = self.budget_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            raise TypeError(f"budget_ratio must be a number, not {ratio!r}")
        if not (math.isfinite(ratio) and 0 <= ratio <= 1):
            raise ValueError(
                f"budget_ratio must be between 0 and 1, not {ratio!r}: it is the share of "
                "calls that may be retried (0.1 = one retry per ten calls)"
            )


class RetryBudget:
    """Retries allowed over a sliding window: ``min_retries + ratio x calls``.

    The window is cut into ten buckets, so counting is O(1) and the window slides in
    steps of a tenth of its length.
    """

    _BUCKETS = 10

    def __init__(
        self,
        ratio: float,
        window: float,
        min_retries: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.window = window
        self.min_retries = min_retries
        self._clock = clock
        self._width = window / self._BUCKETS
        self._calls = [0] * self._BUCKETS
        self._retries = [0] * self._BUCKETS
        self._epoch = math.floor(clock() / self._width)
        self.calls_total = 0
        self.retries_total = 0
        self.denied_total = 0

    def _advance(self) -> int:
        epoch = math.floor(self._clock() / self._width)
        steps = epoch - self._epoch
        if steps > 0:
            for i in range(min(steps, self._BUCKETS)):
                slot = (self._epoch + 1 + i) % self._BUCKETS
                self._calls[slot] = 0
                self._retries[slot] = 0
            self._epoch = epoch
        return epoch % self._BUCKETS

    def record_call(self) -> None:
        """Count a first attempt."""
        self._calls[self._advance()] += 1
        self.calls_total += 1

    def can_retry(self) -> bool:
        """Whether one more retry fits the budget now."""
        self._advance()
        allowed = self.min_retries + self.ratio * sum(self._calls)
        return sum(self._retries) < allowed

    def record_retry(self) -> None:
        """Count a retry that is about to happen."""
        self._retries[self._advance()] += 1
        self.retries_total += 1

    def remaining(self) -> int:
        """Retries still allowed in the current window."""
        self._advance()
        allowed = self.min_retries + self.ratio * sum(self._calls)
        return max(0, math.floor(allowed - sum(self._retries)))

    def snapshot(self) -> dict[str, Any]:
        """Budget left and totals, as plain data."""
        return {
            "remaining": self.remaining(),
            "ratio": self.ratio,
            "window_seconds": self.window,
            "calls_total": self.calls_total,
            "retries_total": self.retries_total,
            "denied_total": self.denied_total,
        }


def retrying(
    settings: RetrySettings,
    budget: RetryBudget,
    classify: Callable[[BaseException], ErrorKind],
    *,
    time_left: float | None = None,
    on_retry: Callable[[RetryCallState], None] | None = None,
) -> AsyncRetrying:
    """A fresh tenacity ``AsyncRetrying`` for one read call.

    Retries only exceptions ``classify`` calls outages or transient errors, never
    guardrails' own (an open breaker is not worth retrying) and never cancellation;
    each retry must fit ``budget``; no sleep goes past ``time_left`` seconds from now.
    """

    def should_retry(exc: BaseException) -> bool:
        if isinstance(exc, GuardrailsError) or not isinstance(exc, Exception):
            return False
        if classify(exc) is ErrorKind.APP:
            return False
        if budget.can_retry():
            return True
        budget.denied_total += 1
        return False

    def before_sleep(state: RetryCallState) -> None:
        budget.record_retry()
        if on_retry is not None:
            on_retry(state)

    stop: stop_base = stop_after_attempt(settings.attempts)
    if time_left is not None:
        stop = stop | stop_before_delay(max(0.0, time_left))
    return AsyncRetrying(
        stop=stop,
        wait=wait_random_exponential(multiplier=settings.base_delay, max=settings.max_delay),
        retry=retry_if_exception(should_retry),
        before_sleep=before_sleep,
        sleep=backoff,
        reraise=True,
    )


async def call_with_retries(
    func: Callable[[], Awaitable[T]],
    settings: RetrySettings,
    budget: RetryBudget,
    classify: Callable[[BaseException], ErrorKind],
    *,
    time_left: float | None = None,
) -> T:
    """Await ``func()`` under :func:`retrying`; the first attempt counts as a call."""
    budget.record_call()
    async for attempt in retrying(settings, budget, classify, time_left=time_left):
        with attempt:
            return await func()
    raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover
