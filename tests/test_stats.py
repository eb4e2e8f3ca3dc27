"""The one percentile (nearest rank): exact values, the definition itself, and its users."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardrails.observe.stats import percentile, rank
from guardrails.observe.telemetry import Histogram
from guardrails.observe.triage import Sample, queue_wait_p95


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        # Nearest rank picks a value that happened: linear interpolation would say 2.5.
        ([1, 2, 3, 4], 0.5, 2),
        ([4, 1, 3, 2], 0.5, 2),  # order does not matter
        ([1, 2, 3, 4], 0.75, 3),
        ([1, 2, 3, 4], 0.76, 4),
        ([5, 1, 4, 2, 3], 0.5, 3),
        ([7.5], 0.0, 7.5),
        ([7.5], 0.99, 7.5),
        ([7.5], 1.0, 7.5),
        (range(1, 101), 0.0, 1),
        (range(1, 101), 0.01, 1),
        (range(1, 101), 0.011, 2),
        (range(1, 101), 0.5, 50),
        (range(1, 101), 0.95, 95),
        (range(1, 101), 0.99, 99),
        (range(1, 101), 1.0, 100),
        # 0.07 x 100 is 7.000000000000001 in floating point: still rank 7, not 8.
        (range(1, 101), 0.07, 7),
        (range(1, 21), 0.95, 19),
        (range(1, 20), 0.95, 19),  # 18.05 -> rank 19
        ([0.25, 0.25, 0.25, 9.0], 0.75, 0.25),
        ([0.25, 0.25, 0.25, 9.0], 0.8, 9.0),
    ],
)
def test_exact_values(values: list[float], fraction: float, expected: float) -> None:
    assert percentile(values, fraction) == expected


def test_no_values_is_nan() -> None:
    assert math.isnan(percentile([], 0.5))


@pytest.mark.parametrize("fraction", [-0.01, 1.01, math.nan, 95])
def test_a_fraction_outside_0_to_1_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction must be between 0 and 1"):
        percentile([1.0], fraction)
    with pytest.raises(ValueError, match="fraction must be between 0 and 1"):
        percentile([], fraction)


@pytest.mark.parametrize(
    ("count", "fraction", "expected"),
    [(1, 0.0, 1), (1, 1.0, 1), (3, 0.5, 2), (20, 0.95, 19), (100, 0.07, 7), (96, 0.95, 92)],
)
def test_rank(count: int, fraction: float, expected: int) -> None:
    assert rank(count, fraction) == expected


@pytest.mark.parametrize("count", [0, -1, 2.0, True])
def test_rank_needs_a_whole_count(count: int) -> None:
    with pytest.raises(ValueError, match="count must be a whole number >= 1"):
        rank(count, 0.5)


@given(
    values=st.lists(st.integers(-1000, 1000), min_size=1, max_size=200),
    percent=st.integers(0, 100),
)
def test_the_smallest_value_with_that_share_at_or_below_it(values: list[int], percent: int) -> None:
    # Integer arithmetic, so the check itself has no rounding: count/n >= percent/100.
    found = percentile(values, percent / 100)
    n = len(values)
    assert found in values
    assert sum(v <= found for v in values) * 100 >= percent * n
    for smaller in {v for v in values if v < found}:
        assert sum(v <= smaller for v in values) * 100 < percent * n


def test_the_telemetry_window_uses_it() -> None:
    histogram = Histogram()
    for at, seconds in enumerate([0.4, 0.1, 0.3, 0.2]):
        histogram.observe(seconds, now=float(at))

    assert histogram.recent_quantile(0.5, within=10, now=3.0) == 0.2
    assert histogram.recent_quantile(0.75, within=10, now=3.0) == 0.3
    assert histogram.recent_quantile(1.0, within=10, now=3.0) == 0.4
    assert histogram.recent_quantile(0.5, within=1.5, now=3.0) == 0.2  # only 0.3 and 0.2
    assert histogram.recent_quantile(0.5, within=1, now=10.0) is None


QUIET = Sample(
    at=0.0,
    arrivals_total=0,
    admitted_total=0,
    in_flight=0,
    limit=10,
    queued=0,
    checked_out=None,
    pool_size=None,
    pool_timeouts_total=0,
    connects_total=0,
    leak_suspects_total=0,
    refused_total=0,
    retry_remaining=10,
)


@given(
    waits=st.lists(st.integers(1, 1000).map(lambda ms: ms / 1000), max_size=60),
    immediate=st.integers(0, 200),
)
def test_triage_counts_immediate_admits_as_zeros_of_the_same_percentile(
    waits: list[float], immediate: int
) -> None:
    admitted = len(waits) + immediate
    window = [QUIET, replace(QUIET, at=1.0, admitted_total=admitted)]
    expected = percentile([0.0] * immediate + waits, 0.95) if admitted else None
    assert queue_wait_p95(window, waits) == expected
