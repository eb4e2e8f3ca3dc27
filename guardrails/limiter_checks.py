"""The checks of :class:`~guardrails.limiter.ConcurrencyLimiter`'s arguments, and the
duration helper every setting in seconds goes through.

Each check says what to change; the limiter calls :func:`check_arguments` once, at
construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta

from guardrails.adaptive import AdaptiveLimit

__all__ = ["check_arguments", "seconds"]


def seconds(value: float | timedelta, name: str) -> float:
    """Convert a duration given as seconds or ``timedelta`` to seconds, rejecting negatives."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or a timedelta, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


def check_arguments(
    limit: object,
    max_queue: object,
    reserve_critical: object,
    low_watermark: object,
    delay_target_holds: object,
    clock: Callable[[], float] | None,
    adaptive: object,
) -> int:
    """Raise what to change about a bad argument; returns ``reserve_critical`` (None: 0)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(
            f"limit must be a whole number of slots >= 1, not {limit!r}: set it to the "
            "connection budget per process (ConnectionBudget.per_process)"
        )
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(
            f"max_queue must be a whole number >= 0, not {max_queue!r} "
            "(0 means: shed at once when every slot is busy)"
        )
    if reserve_critical is None:
        reserve_critical = 0
    if (
        isinstance(reserve_critical, bool)
        or not isinstance(reserve_critical, int)
        or not 0 <= reserve_critical < limit
    ):
        raise ValueError(
            f"reserve_critical must be a whole number from 0 to limit - 1 ({limit - 1}), "
            f"not {reserve_critical!r}: it is how many slots normal work leaves idle for "
            "critical work (None or 0: none; critical work is served first anyway)"
        )
    if (
        isinstance(low_watermark, bool)
        or not isinstance(low_watermark, int | float)
        or not 0 < low_watermark <= 1
    ):
        raise ValueError(
            f"low_watermark must be a fraction in (0, 1], not {low_watermark!r}: low "
            "priority work is admitted only while utilisation is below it"
        )
    if (
        isinstance(delay_target_holds, bool)
        or not isinstance(delay_target_holds, int | float)
        or not 0 <= delay_target_holds < math.inf
    ):
        raise ValueError(
            f"delay_target_holds must be a number >= 0, not {delay_target_holds!r}: under "
            "sustained overload the queue admits expected waits up to this many hold times"
        )
    if clock is not None and not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds, not {clock!r}")
    if adaptive is not None and not isinstance(adaptive, AdaptiveLimit):
        raise TypeError(f"adaptive must be an AdaptiveLimit or None, not {adaptive!r}")
    return reserve_critical
