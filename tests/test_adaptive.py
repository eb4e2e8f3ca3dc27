"""The adaptive limit's rules, each with exact arithmetic on a fake clock, and its bounds
as properties over arbitrary windows."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import guardrails as gr
from guardrails.adaptive import AdaptiveController


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def controller(ceiling: int = 20, **kwargs: object) -> tuple[AdaptiveController, Clock]:
    """A controller on a fake clock; tolerance 1.5 unless given, for round numbers."""
    kwargs.setdefault("tolerance", 1.5)
    clock = Clock()
    return gr.AdaptiveLimit(**kwargs).controller(ceiling, clock), clock  # type: ignore[arg-type]


def window(ctl: AdaptiveController, clock: Clock, hold: float, n: int = 10) -> bool:
    """Let one window's time pass, then complete ``n`` holds of ``hold`` seconds."""
    clock.now += 0.5
    ended = [ctl.sample(hold) for _ in range(n)]
    assert not any(ended[:-1]), "a window ended before its last sample"
    return ended[-1]


def test_the_first_window_learns_the_baseline_and_the_limit_starts_at_the_ceiling() -> None:
    ctl, clock = controller()
    assert (ctl.limit, ctl.baseline) == (20, None)
    assert window(ctl, clock, 0.020)
    assert (ctl.limit, ctl.baseline) == (20, 0.020)
    assert ctl.last is not None
    assert ctl.last.reason == "learn"


def test_a_window_needs_both_its_time_and_its_samples() -> None:
    ctl, clock = controller()
    assert not any(ctl.sample(0.02) for _ in range(50))  # many samples, no time
    clock.now += 0.5
    assert ctl.sample(0.02)  # time passed: the next sample ends it
    clock.now += 0.5
    assert not any(ctl.sample(0.02) for _ in range(9))  # time, but 9 of 10 samples
    assert ctl.windows_total == 1
    assert ctl.sample(0.02)
    assert ctl.windows_total == 2


def test_the_median_of_the_window_decides() -> None:
    ctl, clock = controller()
    window(ctl, clock, 0.020)
    clock.now += 0.5
    # Four very slow outliers among ten: the median (nearest rank, the 5th) is 20 ms.
    for hold in (0.02,) * 6 + (5.0,) * 3:
        ctl.sample(hold)
    assert ctl.sample(5.0)
    assert ctl.last is not None
    assert ctl.last.short == 0.02
    assert ctl.limit == 20


def test_slower_holds_lower_the_limit_by_the_smoothed_gradient() -> None:
    ctl, clock = controller()
    window(ctl, clock, 0.020)
    window(ctl, clock, 0.060)
    # gradient = clamp(1.5 x 20 / 60) = 0.5; target 20 x 0.5 = 10; 20 x 0.5 + 10 x 0.5
    assert ctl.gradient == 0.5
    assert ctl.estimate == 15.0
    assert ctl.limit == 15
    assert ctl.last is not None
    assert ctl.last.reason == "slower"


def test_the_gradient_never_goes_below_one_half() -> None:
    ctl, clock = controller()
    window(ctl, clock, 0.020)
    window(ctl, clock, 2.0)  # 100 times slower: still only gradient 0.5
    assert ctl.gradient == 0.5
    assert ctl.limit == 15


def test_no_queue_allowance_below_gradient_one_so_the_limit_cannot_creep_up() -> None:
    ctl, clock = controller()
    window(ctl, clock, 0.020)
    window(ctl, clock, 0.0375)  # gradient = 1.5 x 20 / 37.5 = 0.8
    assert ctl.gradient == pytest.approx(0.8)
    # 20 x 0.5 + (20 x 0.8) x 0.5 = 18: had the allowance of 4 been added, 20.
    assert ctl.estimate == pytest.approx(18.0)
    for _ in range(20):
        before = ctl.estimate
        window(ctl, clock, 0.0375)
        assert ctl.estimate < before or ctl.limit == 1


def test_healthy_windows_add_the_smoothed_allowance_up_to_the_ceiling() -> None:
    ctl, clock = controller()
    window(ctl, clock, 0.020)
    window(ctl, clock, 0.060)
    assert ctl.limit == 15
    window(ctl, clock, 0.025)  # within tolerance: gradient 1
    # target 15 x 1 + 4 = 19; 15 x 0.5 + 19 x 0.5 = 17
    assert ctl.gradient == 1.0
    assert (ctl.estimate, ctl.limit) == (17.0, 17)
    window(ctl, clock, 0.025)
    assert ctl.limit == 19
    window(ctl, clock, 0.025)
    assert ctl.limit == 20
    window(ctl, clock, 0.025)
    assert (ctl.estimate, ctl.limit) == (20.0, 20)


def test_the_baseline_follows_faster_windows_down_and_never_creeps_up() -> None:
    ctl, clock = controller(baseline_windows=10)
    for _ in range(3):  # the warm-up
        window(ctl, clock, 0.020)
    window(ctl, clock, 0.010)
    assert ctl.baseline == pytest.approx(0.020 + (0.010 - 0.020) / 10)
    window(ctl, clock, 0.028)  # healthy, but slower than the baseline: not learnt
    window(ctl, clock, 0.100)  # slower: not learnt either
    assert ctl.baseline == pytest.approx(0.019)


def test_holds_under_the_minimum_sample_are_not_samples() -> None:
    ctl, clock = controller()
    clock.now += 1.0
    assert not any(ctl.sample(50e-6) for _ in range(100))
    assert ctl.windows_total == 0
    assert ctl.baseline is None


def test_a_pool_timeout_is_a_drop_that_multiplies_the_limit() -> None:
    ctl, clock = controller()
    window(ctl, clock, 0.020)
    ctl.drop()
    ctl.drop()
    clock.now += 0.5
    assert ctl.sample(0.020)  # a healthy hold, but the drops decide, with no more samples
    assert ctl.last is not None
    assert ctl.last.reason == "drop"
    assert (ctl.estimate, ctl.limit) == (18.0, 18)  # once per window: 20 x 0.9
    assert ctl.drops_total == 2
    assert ctl.baseline == 0.020


def test_a_drop_ends_a_due_window_without_samples() -> None:
    ctl, clock = controller()
    ctl.drop()
    assert not ctl.tick()  # not due yet
    clock.now += 0.5
    assert ctl.tick()
    assert ctl.limit == 18
    assert not ctl.tick()  # the drop was counted once


def test_after_reset_after_windows_slower_at_the_floor_the_baseline_is_learnt_anew() -> None:
    ctl, clock = controller(ceiling=4, floor=2, reset_after=3)
    window(ctl, clock, 0.010)
    window(ctl, clock, 0.100)  # 4 -> 3: next to the floor, the 1st window
    assert ctl.limit == 3
    window(ctl, clock, 0.100)  # 3 -> 2.25: the floor, the 2nd
    assert ctl.limit == 2
    assert ctl.baseline == 0.010
    window(ctl, clock, 0.100)  # the 3rd: reset
    assert ctl.last is not None
    assert ctl.last.reason == "reset"
    assert ctl.baseline == 0.100
    assert ctl.resets_total == 1
    window(ctl, clock, 0.100)  # now healthy: it climbs again
    assert ctl.limit == 4


def test_healthy_windows_next_to_the_floor_do_not_start_the_count_over() -> None:
    # A noisy database flickers between slower and healthy at the floor: still stuck.
    ctl, clock = controller(ceiling=2, floor=2, reset_after=3)
    window(ctl, clock, 0.010)
    window(ctl, clock, 0.100)
    window(ctl, clock, 0.010)
    assert ctl.resets_total == 0
    window(ctl, clock, 0.100)
    assert ctl.resets_total == 1
    assert ctl.baseline == 0.100


def test_leaving_the_floor_starts_the_count_over() -> None:
    ctl, clock = controller(ceiling=8, floor=1, reset_after=3)
    window(ctl, clock, 0.010)
    for _ in range(5):
        window(ctl, clock, 0.100)  # 8 -> 6 -> 4 -> 3 -> 2 (next to the floor: 1) -> 1 (2)
    assert (ctl.limit, ctl.resets_total) == (1, 0)
    window(ctl, clock, 0.100)  # 3: reset
    assert ctl.resets_total == 1
    for _ in range(2):
        window(ctl, clock, 0.100)  # healthy against the new baseline: 1 -> 2 -> 4
    assert ctl.limit == 4
    for _ in range(3):
        window(ctl, clock, 1.0)  # slower again: 4 -> 3 (away from the floor), 2 (1), 2 (2)
    assert (ctl.limit, ctl.resets_total) == (2, 1)
    window(ctl, clock, 1.0)  # 3: the count started over when the limit left the floor
    assert ctl.resets_total == 2


def test_the_first_windows_baseline_is_the_lowest_median_seen() -> None:
    ctl, clock = controller()
    window(ctl, clock, 0.090)  # a cold first window
    window(ctl, clock, 0.038)
    window(ctl, clock, 0.036)
    assert ctl.baseline == 0.036
    assert ctl.limit == 20
    window(ctl, clock, 0.030)  # after the warm-up: a tenth of the way down
    assert ctl.baseline == pytest.approx(0.036 + (0.030 - 0.036) / 10)
    window(ctl, clock, 0.090)  # slower: the limit comes down, the baseline stays
    assert ctl.limit < 20
    assert ctl.baseline == pytest.approx(0.0354)


def test_the_default_tolerance_lets_holds_double_before_the_limit_comes_down() -> None:
    clock = Clock()
    ctl = gr.AdaptiveLimit().controller(20, clock)
    window(ctl, clock, 0.020)
    window(ctl, clock, 0.039)  # under twice the baseline: healthy
    assert (ctl.gradient, ctl.limit) == (1.0, 20)
    window(ctl, clock, 0.060)  # gradient 2 x 20 / 60 = 2/3: 20 x 0.5 + 13.33 x 0.5
    assert ctl.gradient == pytest.approx(2 / 3)
    assert ctl.limit == 16


def test_snapshot_shows_the_limit_its_bounds_and_what_the_last_window_saw() -> None:
    ctl, clock = controller(floor=3)
    window(ctl, clock, 0.020)
    window(ctl, clock, 0.060)
    assert ctl.snapshot() == {
        "limit": 15,
        "floor": 3,
        "ceiling": 20,
        "estimate": 15.0,
        "baseline_seconds": 0.020,
        "short_seconds": 0.060,
        "gradient": 0.5,
        "last_reason": "slower",
        "windows_total": 2,
        "drops_total": 0,
        "resets_total": 0,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"floor": 0}, "floor must be a whole number >= 1"),
        ({"tolerance": 0.9}, "tolerance"),
        ({"smoothing": 0}, "smoothing"),
        ({"window": -1}, "window"),
        ({"window": float("nan")}, "window"),
        ({"min_samples": 0}, "min_samples"),
        ({"drop_factor": 0.2}, "drop_factor"),
        ({"queue_allowance": True}, "queue_allowance"),
    ],
)
def test_bad_settings_say_what_to_change(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gr.AdaptiveLimit(**kwargs)  # type: ignore[arg-type]


def test_a_floor_above_the_configured_limit_is_refused() -> None:
    with pytest.raises(ValueError, match=r"floor=6.*above the configured limit"):
        gr.Guardrails(concurrency=5, adaptive=gr.AdaptiveLimit(floor=6))


def test_window_takes_a_timedelta() -> None:
    ctl, clock = controller(window=timedelta(milliseconds=250))
    clock.now += 0.25
    assert any(ctl.sample(0.02) for _ in range(10))


# -- the limiter applies it, within its cap -----------------------------------------------


def test_the_limiter_applies_the_adaptive_limit_under_its_cap() -> None:
    clock = Clock()
    limiter = gr.ConcurrencyLimiter(20, adaptive=gr.AdaptiveLimit(), clock=clock)
    adaptive = limiter.adaptive
    assert adaptive is not None
    for hold in (0.020, 0.060):
        clock.now += 0.5
        for _ in range(10):
            limiter.completed(clock.now - hold)
    # The default tolerance 2: gradient 2 x 20 / 60 = 2/3, so 20 x 0.5 + 13.3 x 0.5
    assert (limiter.limit, limiter.wanted, limiter.cap) == (16, 16, 20)
    limiter.set_limit(6)  # a lease of 6: the lesser applies
    assert (limiter.limit, limiter.cap) == (6, 6)
    limiter.set_limit(20)
    assert limiter.limit == 16
    snap = limiter.snapshot()
    assert (snap["limit"], snap["configured_limit"], snap["adaptive"]["limit"]) == (16, 20, 16)


def test_a_lowered_limit_lets_work_in_flight_finish_and_admits_below_it() -> None:
    clock = Clock()
    limiter = gr.ConcurrencyLimiter(4, adaptive=gr.AdaptiveLimit(min_samples=1), clock=clock)
    assert all(limiter.try_take(gr.Priority.NORMAL) for _ in range(4))
    clock.now += 0.5
    limiter.completed(clock.now - 0.01)  # learn
    clock.now += 0.5
    limiter.completed(clock.now - 1.0)  # slower: 4 -> 3
    assert limiter.limit == 3
    limiter.give_back()
    assert not limiter.try_take(gr.Priority.NORMAL)  # 3 in flight: the limit
    limiter.give_back()
    assert limiter.try_take(gr.Priority.NORMAL)
    for _ in range(3):
        limiter.give_back()
    assert limiter.in_flight == 0


# -- properties -------------------------------------------------------------------------

windows = st.lists(
    st.tuples(
        st.floats(min_value=1e-4, max_value=30.0, allow_nan=False),  # the window's hold
        st.integers(min_value=0, max_value=3),  # drops in it
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    ceiling=st.integers(min_value=1, max_value=500),
    floor=st.integers(min_value=1, max_value=500),
    tolerance=st.floats(min_value=1.0, max_value=4.0),
    smoothing=st.floats(min_value=0.01, max_value=1.0),
    allowance=st.floats(min_value=0.0, max_value=50.0),
    drop_factor=st.floats(min_value=0.5, max_value=1.0),
    reset_after=st.integers(min_value=1, max_value=5),
    seen=windows,
)
def test_the_limit_stays_between_floor_and_ceiling_and_moves_at_most_2x_a_window(
    ceiling: int,
    floor: int,
    tolerance: float,
    smoothing: float,
    allowance: float,
    drop_factor: float,
    reset_after: int,
    seen: list[tuple[float, int]],
) -> None:
    floor = min(floor, ceiling)
    ctl, clock = controller(
        ceiling,
        floor=floor,
        tolerance=tolerance,
        smoothing=smoothing,
        queue_allowance=allowance,
        drop_factor=drop_factor,
        reset_after=reset_after,
        min_samples=3,
    )
    for hold, drops in seen:
        before = ctl.limit
        for _ in range(drops):
            ctl.drop()
        clock.now += 0.5
        # A window ends by its third sample (some may be left from the last window), at
        # its first when a pool timed out.
        taken = next((n for n in range(1, 4) if ctl.sample(hold)), None)
        assert taken == 1 if drops else taken is not None
        assert floor <= ctl.limit <= ceiling
        assert math.ceil(before / 2) <= ctl.limit <= 2 * before
        assert ctl.limit <= ctl.estimate < ctl.limit + 1
        assert ctl.baseline is None or ctl.baseline >= 1e-4
