"""An adaptive concurrency limit under the connection budget, found from slot hold times.

The budget says how many connections a process may hold; it does not say how many
concurrent queries the database serves well right now. Past the database's own
capacity (its CPU cores, its disks, a lock) more concurrency adds latency and no
throughput. :class:`AdaptiveLimit` lowers the number of slots when slots are held
longer than usual, and raises it back, never above the configured limit, never below
``floor``.

The rule is gradient-based, in the manner of Netflix's Gradient2, and is applied once
per window (at least ``window`` seconds and ``min_samples`` samples)::

    short    = median hold time of the window's samples
    gradient = clamp(tolerance x baseline / short, 0.5, 1.0)
    target   = limit x gradient, plus queue_allowance only when gradient == 1
    limit    = limit x (1 - smoothing) + target x smoothing, within [floor, ceiling]

A window in which a pool timed out is a drop instead: ``limit x drop_factor``.

What keeps it honest, against the failures other implementations ran into:

- The baseline learns only from windows at or below it (an average that moves
  ``1 / baseline_windows`` of the way down). It never creeps up with the load it is
  meant to detect; a database that became slower for good is learnt by the reset:
  after ``reset_after`` windows at or next to the floor, a slower window's median
  becomes the baseline. Over the first :data:`WARMUP` windows the baseline is the
  lowest median seen, so that one cold first window (connections opening, caches
  filling) does not set it.
- Because the baseline only falls, it sits near the fastest windows the database has
  served, not their average: ``tolerance`` (2.0) leaves room for the ordinary spread
  of hold times around it.
- The queue allowance is added only at gradient 1, never while the gradient is below
  it: otherwise a gradient near 0.8 plus the allowance makes the limit creep upward.
- Samples are slot hold times of requests that completed: sheds and refusals hold no
  slot, exempt routes take none, failed requests and pool timeouts are not samples
  (a constant timeout latency would look healthy), and holds under ``min_sample``
  (100 µs) are dropped as not being database work.
- Nothing is pinned: the limit is never forced to the floor to measure a minimum,
  so adapting never sheds bursts of requests on its own.
- The first windows seen set the baseline. A process that starts under full overload
  learns the overloaded hold time and behaves like the fixed limit until the load
  eases (or the limit falls for another reason) and a faster window is seen.

Not thread-safe except :meth:`AdaptiveController.drop`, which pool watchers may call
from any thread; everything else runs on the event loop.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from guardrails.observe.stats import percentile

__all__ = ["AdaptiveController", "AdaptiveLimit", "Window"]

MIN_GRADIENT = 0.5
"""The most one window's gradient may lower the limit: it at most halves."""

WARMUP = 3
"""Windows, the first included, over which the baseline is the lowest median seen."""


def _number(value: object, name: str, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    if not low <= value <= high:
        shown = f"[{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ValueError(f"{name} must be {shown}, not {value!r}")
    return float(value)


def _whole(value: object, name: str, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class AdaptiveLimit:
    """Settings of an adaptive concurrency limit; pass it as ``Guardrails(adaptive=...)``.

    The limit starts at the configured ``concurrency`` (or the budget's
    ``per_process``), which stays its ceiling, and moves between ``floor`` and it::

        guard = gr.Guardrails(concurrency=20, adaptive=gr.AdaptiveLimit(floor=2))

    - ``floor``: the fewest slots it ever leaves (at least 1).
    - ``tolerance``: how much longer than the baseline a slot may be held before the
      limit comes down (2.0: twice as long).
    - ``smoothing``: the share of each window's target taken at once (0 < s <= 1).
    - ``queue_allowance``: slots a healthy window may add before smoothing, so that
      the limit climbs back by ``smoothing x queue_allowance`` a window.
    - ``window`` seconds and ``min_samples``: a window ends when it has lasted that
      long and holds that many samples.
    - ``baseline_windows``: how many windows the baseline's average spans on its way
      down.
    - ``reset_after``: windows at or next to the floor (``floor + 1``) after which a
      slower window's median becomes the baseline.
    - ``drop_factor``: what a window with a pool timeout multiplies the limit by.
    - ``min_sample``: hold times below this many seconds are not samples.
    """

    floor: int = 1
    tolerance: float = 2.0
    smoothing: float = 0.5
    queue_allowance: float = 4.0
    window: float | timedelta = 0.5
    min_samples: int = 10
    baseline_windows: int = 10
    reset_after: int = 30
    drop_factor: float = 0.9
    min_sample: float = 100e-6

    def __post_init__(self) -> None:
        _whole(self.floor, "floor", low=1)
        _number(self.tolerance, "tolerance (how much longer than the baseline is healthy)", low=1)
        _number(self.smoothing, "smoothing", low=0.01, high=1)
        _number(self.queue_allowance, "queue_allowance", low=0)
        window = _number(self.window, "window (seconds)", low=0.001)
        object.__setattr__(self, "window", window)
        _whole(self.min_samples, "min_samples", low=1)
        _whole(self.baseline_windows, "baseline_windows", low=1)
        _whole(self.reset_after, "reset_after", low=1)
        _number(self.drop_factor, "drop_factor", low=MIN_GRADIENT, high=1)
        _number(self.min_sample, "min_sample (seconds)", low=0)

    def controller(
        self, ceiling: int, clock: Callable[[], float] | None = None
    ) -> AdaptiveController:
        """A running limit for ``ceiling`` slots (the limiter makes one; tests too)."""
        return AdaptiveController(self, ceiling, clock)


@dataclass(frozen=True, slots=True)
class Window:
    """What one window decided, as health, metrics and triage report it."""

    ended: float
    """When it ended, on the controller's clock."""
    samples: int
    short: float | None
    """Median hold time of the window (None when a drop decided it without samples)."""
    baseline: float
    gradient: float
    drops: int
    before: int
    after: int
    reason: str
    """``"learn"`` (first window), ``"healthy"``, ``"slower"``, ``"drop"`` or ``"reset"``."""


class AdaptiveController:
    """The running adaptive limit of one limiter: feed it samples, read ``limit``.

    ``sample(seconds)`` after each completed slot hold, ``drop()`` when a pool timed
    out; each call may end a window, after which ``limit`` may have changed. The
    limiter applies ``limit`` to its slots; :meth:`observe` returns it for that.
    """

    def __init__(
        self, settings: AdaptiveLimit, ceiling: int, clock: Callable[[], float] | None = None
    ) -> None:
        _whole(ceiling, "ceiling", low=1)
        if settings.floor > ceiling:
            raise ValueError(
                f"AdaptiveLimit(floor={settings.floor}) is above the configured limit "
                f"({ceiling}): lower floor, or raise concurrency"
            )
        self.settings = settings
        self.ceiling = ceiling
        self.clock: Callable[[], float] = clock if clock is not None else time.monotonic
        self.estimate = float(ceiling)
        """The limit before rounding down to whole slots."""
        self.limit = ceiling
        """Slots the limiter may use now, between ``floor`` and ``ceiling``."""
        self.baseline: float | None = None
        """Seconds a slot is held when the database is healthy; None until learnt."""
        self.gradient = 1.0
        self.windows_total = 0
        self.resets_total = 0
        self.drops_total = 0
        self.last: Window | None = None
        window = settings.window
        self._window = window.total_seconds() if isinstance(window, timedelta) else window
        self._samples: list[float] = []
        self._started = self.clock()
        self._drops = 0
        self._seen_drops = 0
        self._near_floor = 0
        self._lock = threading.Lock()

    def sample(self, seconds: float) -> bool:
        """One completed slot hold; True when it ended a window (``limit`` may differ)."""
        if seconds < self.settings.min_sample:
            return False
        self._samples.append(seconds)
        return self._maybe_end(self.clock())

    def drop(self) -> None:
        """A pool gave up waiting for a connection: the window ends with a decrease.

        Safe from any thread; the decrease is applied by the next :meth:`sample` or
        :meth:`tick` on the event loop.
        """
        with self._lock:
            self._drops += 1

    def tick(self) -> bool:
        """End the window if it is due without a new sample (a drop with no traffic)."""
        return self._maybe_end(self.clock())

    def _maybe_end(self, now: float) -> bool:
        settings = self.settings
        if now - self._started < self._window:
            return False
        drops = self._drops - self._seen_drops
        if len(self._samples) < settings.min_samples and not drops:
            return False
        self._seen_drops += drops
        samples, self._samples = self._samples, []
        self._started = now
        self._decide(now, samples, drops)
        return True

    def _decide(self, now: float, samples: list[float], drops: int) -> None:
        settings = self.settings
        before = self.limit
        short = percentile(samples, 0.5) if samples else None
        baseline = self.baseline
        if drops:
            self.drops_total += drops
            reason = "drop"
            self.estimate *= settings.drop_factor
        elif short is None:  # pragma: no cover - a window ends with samples or drops
            return
        elif baseline is None:
            reason = "learn"
            self.baseline = baseline = short
        else:
            if self.windows_total < WARMUP and short < baseline:
                self.baseline = baseline = short  # the first windows may have been cold
            gradient = min(1.0, max(MIN_GRADIENT, settings.tolerance * baseline / short))
            self.gradient = gradient
            target = self.estimate * gradient
            if gradient >= 1.0:
                reason = "healthy"
                target += settings.queue_allowance
                if short < baseline:
                    baseline += (short - baseline) / settings.baseline_windows
                    self.baseline = baseline
            else:
                reason = "slower"
            s = settings.smoothing
            self.estimate = self.estimate * (1 - s) + target * s
        self.estimate = min(float(self.ceiling), max(float(settings.floor), self.estimate))
        # Whole slots, and never more than halved or doubled by one window.
        limit = max(settings.floor, min(self.ceiling, math.floor(self.estimate + 1e-9)))
        limit = min(max(limit, math.ceil(before * MIN_GRADIENT)), before * 2)
        self.estimate = min(max(self.estimate, float(limit)), float(limit) + 0.999)
        if limit <= settings.floor + 1:
            # At the floor or flickering next to it: a healthy window there does not
            # start the count over, or a noisy database would never be learnt anew.
            self._near_floor += 1
            if self._near_floor >= settings.reset_after and reason == "slower":
                # Slower than the baseline for that long at the floor: the database
                # changed, not the load. Learn it anew.
                reason = "reset"
                self.baseline = baseline = short
                self.resets_total += 1
                self._near_floor = 0
        else:
            self._near_floor = 0
        self.limit = limit
        self.windows_total += 1
        self.last = Window(
            ended=now,
            samples=len(samples),
            short=short,
            baseline=baseline if baseline is not None else short or 0.0,
            gradient=self.gradient,
            drops=drops,
            before=before,
            after=limit,
            reason=reason,
        )

    def snapshot(self) -> dict[str, Any]:
        """The limit, its bounds, and what the last window saw, as plain data."""
        last = self.last
        return {
            "limit": self.limit,
            "floor": self.settings.floor,
            "ceiling": self.ceiling,
            "estimate": round(self.estimate, 3),
            "baseline_seconds": self.baseline,
            "short_seconds": last.short if last is not None else None,
            "gradient": self.gradient,
            "last_reason": last.reason if last is not None else None,
            "windows_total": self.windows_total,
            "drops_total": self.drops_total,
            "resets_total": self.resets_total,
        }
