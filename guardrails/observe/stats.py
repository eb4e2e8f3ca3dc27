"""Percentiles: the one definition behind every p50, p95 and p99 guardrails reports.

Nearest rank: the ``fraction`` percentile of ``n`` values is the value at rank
``ceil(fraction x n)`` (at least 1) in ascending order, that is the smallest value
with at least ``fraction`` of all values at or below it. It is always one of the
values, never an interpolation between two, so a p95 of pool waits is a wait that
really happened. Pool snapshots, triage, the demo and the benchmarks all use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["percentile", "rank"]

# fraction x count carries float noise (0.07 x 100 == 7.000000000000001), which must
# not push an exact product up to the next rank. The noise is far below this for any
# count a process holds in memory.
_NOISE = 1e-9


def rank(count: int, fraction: float) -> int:
    """The 1-based rank of the nearest-rank ``fraction`` percentile among ``count`` values.

    For callers that know some values without holding them (triage counts requests
    admitted at once as waits of 0 s). ``fraction`` is in 0..1; ``count`` at least 1.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a whole number >= 1, not {count!r}")
    _check(fraction)
    return max(1, math.ceil(fraction * count - _NOISE))


def percentile(values: Iterable[float], fraction: float) -> float:
    """The nearest-rank ``fraction`` percentile of ``values`` (``fraction`` in 0..1).

    ``values`` need not be sorted. ``percentile([1, 2, 3, 4], 0.5)`` is 2 and
    ``percentile(range(1, 101), 0.95)`` is 95; ``fraction`` 0 gives the smallest value,
    1 the largest. NaN when there are no values.
    """
    _check(fraction)
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[rank(len(ordered), fraction) - 1]


def _check(fraction: float) -> None:
    if isinstance(fraction, bool) or not 0 <= fraction <= 1:  # also false for nan
        raise ValueError(f"fraction must be between 0 and 1 (0.95 for p95), not {fraction!r}")
