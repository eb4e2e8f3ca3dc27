"""The adaptive-limit benchmark's helpers that read the windows: when it settled, recovered.

The benchmark itself (``benchmarks/adaptive.py``) measures; these are its counting rules
(``benchmarks/adaptive_report.py``),
on made-up limit sequences, so that a report's "settled after 4 windows" means what it says.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import adaptive_report

    return adaptive_report


def test_settled_after_counts_to_the_last_window_outside_the_band(bench: ModuleType) -> None:
    # Ends around 4 (band: 2 either side); the 7 in window 5 is the last excursion.
    limits = [20, 15, 11, 8, 7, 4, 5, 3, 4, 4, 5, 4]
    assert bench.settled_after(limits) == 6
    assert bench.reached(limits) == 6


def test_reached_is_the_first_window_near_the_end_even_if_it_leaves_again(
    bench: ModuleType,
) -> None:
    limits = [20, 12, 4, 9, 4, 4, 3, 4]
    assert bench.reached(limits) == 3
    assert bench.settled_after(limits) == 5


def test_a_limit_that_never_moves_settled_at_the_first_window(bench: ModuleType) -> None:
    assert bench.settled_after([20, 20, 20]) == 1
    assert bench.reached([20, 20, 20]) == 1


def test_a_limit_still_moving_at_the_end_has_not_settled(bench: ModuleType) -> None:
    # The median of the second half is 10, and the last window is 15 away from it.
    assert bench.settled_after([20, 18, 10, 10, 10, 25]) is None


def test_no_windows_no_answer(bench: ModuleType) -> None:
    assert bench.settled_after([]) is None
    assert bench.reached([]) is None
    assert bench.windows_until([], 18) is None


def test_windows_until_counts_the_window_that_got_there(bench: ModuleType) -> None:
    assert bench.windows_until([4, 6, 8, 18, 20], 18) == 4
    assert bench.windows_until([20], 18) == 1
    assert bench.windows_until([4, 6, 17], 18) is None


def test_in_span_is_half_open(bench: ModuleType) -> None:
    windows = [{"ended": 1.0}, {"ended": 2.0}, {"ended": 3.0}]
    assert bench.in_span(windows, 1.0, 3.0) == windows[:2]


def test_settings_parse_whole_numbers_and_fractions(bench: ModuleType) -> None:
    import adaptive

    assert adaptive._settings(["baseline_windows=1", "tolerance=2.5"]) == {
        "baseline_windows": 1,
        "tolerance": 2.5,
    }
