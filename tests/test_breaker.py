"""The breaker's state machine, driven from asyncio, on a clock the test moves."""

from __future__ import annotations

import asyncio
import logging

import anyio
import anyio.lowlevel
import psycopg
import pytest

import guardrails as gr
from guardrails.breaker import Breaker

pytestmark = pytest.mark.anyio


class Clock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def outage() -> BaseException:
    # What psycopg raises for a connection that failed: an outage by its type (a builtin
    # ConnectionRefusedError counts only when a driver raised it).
    return psycopg.OperationalError("connection failed")


def app_error() -> BaseException:
    return KeyError("not a database problem")


def make(clock: Clock, **settings: object) -> Breaker:
    options: dict[str, object] = {"fail_max": 3, "reset_timeout": 10.0, **settings}
    return Breaker(gr.BreakerSettings(**options), clock=clock)  # type: ignore[arg-type]


def fail(breaker: Breaker, times: int, exc: BaseException | None = None) -> None:
    for _ in range(times):
        trial = breaker.admit()
        breaker.record(trial, exc or outage())


def test_opens_after_fail_max_consecutive_outages() -> None:
    breaker = make(Clock())
    fail(breaker, 2)
    assert (breaker.state, breaker.failures) == ("closed", 2)
    fail(breaker, 1)
    assert breaker.state == "open"
    assert breaker.snapshot()["opened_at"] is not None


def test_a_success_or_an_app_error_breaks_the_streak() -> None:
    breaker = make(Clock())
    fail(breaker, 2)
    breaker.record(breaker.admit())  # success
    fail(breaker, 2)
    breaker.record(breaker.admit(), app_error())  # the database answered
    fail(breaker, 2)
    assert (breaker.state, breaker.failures) == ("closed", 2)


def test_app_errors_never_open_it() -> None:
    breaker = make(Clock())
    fail(breaker, 50, app_error())
    assert (breaker.state, breaker.failures) == ("closed", 0)


def test_cancellation_counts_for_nothing() -> None:
    breaker = make(Clock())
    fail(breaker, 2)
    breaker.record(breaker.admit(), asyncio.CancelledError())
    assert (breaker.state, breaker.failures) == ("closed", 2)


def test_open_refuses_with_retry_after_rounded_up_until_the_period_ends() -> None:
    clock = Clock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.now += 2.5
    with pytest.raises(gr.Unavailable) as refused:
        breaker.admit()
    assert refused.value.retry_after == 8  # 7.5 s left, rounded up
    assert breaker.snapshot()["retry_after"] == 8
    clock.now += 7.4
    with pytest.raises(gr.Unavailable) as refused:
        breaker.admit()
    assert refused.value.retry_after == 1


def test_one_trial_at_a_time_and_a_successful_trial_closes() -> None:
    clock = Clock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.now += 10
    trial = breaker.admit()
    assert trial is not None
    assert breaker.state == "half_open"
    for _ in range(5):  # everyone else is refused at once: no probe stampede
        with pytest.raises(gr.Unavailable) as refused:
            breaker.admit()
        assert refused.value.retry_after == 1
    breaker.record(trial)
    assert (breaker.state, breaker.failures) == ("closed", 0)
    assert breaker.admit() is None


def test_a_failed_trial_opens_for_a_new_period() -> None:
    clock = Clock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.now += 10
    trial = breaker.admit()
    breaker.record(trial, outage())
    assert breaker.state == "open"
    assert breaker.retry_after == 10
    clock.now += 10
    assert breaker.admit() is not None


def test_a_cancelled_or_released_trial_lets_the_next_caller_try() -> None:
    clock = Clock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.now += 10
    first = breaker.admit()
    breaker.record(first, asyncio.CancelledError())
    assert breaker.state == "half_open"
    second = breaker.admit()
    breaker.release(second)
    third = breaker.admit()
    assert third is not None
    breaker.record(third)
    assert breaker.state == "closed"


def test_late_outcomes_of_calls_admitted_while_closed_are_ignored() -> None:
    clock = Clock()
    breaker = make(clock)
    slow = [breaker.admit() for _ in range(5)]  # five calls in flight, all admitted closed
    for trial in slow[:3]:
        breaker.record(trial, outage())
    assert breaker.state == "open"
    transitions = breaker.transitions
    for trial in slow[3:]:  # finishing after it opened: a success must not close it
        breaker.record(trial)
    breaker.record(None, outage())
    assert (breaker.state, breaker.transitions) == ("open", transitions)


def test_each_transition_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    changes: list[tuple[str | None, str]] = []
    breaker = Breaker(
        gr.BreakerSettings(fail_max=2, reset_timeout=5),
        clock=clock,
        on_change=lambda old, new, snapshot: changes.append((old, new)),
    )
    with caplog.at_level(logging.INFO, logger="guardrails.breaker"):
        fail(breaker, 2)
        fail(breaker, 0)
        for _ in range(3):
            with pytest.raises(gr.Unavailable):
                breaker.admit()
        clock.now += 5
        breaker.record(breaker.admit())
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert "closed -> open" in messages[0]
    assert caplog.records[0].levelno == logging.WARNING


async def test_an_outcome_is_recorded_only_once_the_call_has_run() -> None:
    # pybreaker's call(async_fn) would record a success when the coroutine is created;
    # here the outcome handed to record() is the awaited result.
    breaker = make(Clock(), fail_max=1)

    async def refused() -> None:
        await anyio.lowlevel.checkpoint()
        raise outage()

    trial = breaker.admit()
    pending = refused()
    assert breaker.state == "closed"
    with pytest.raises(psycopg.OperationalError) as raised:
        await pending
    breaker.record(trial, raised.value)
    assert breaker.state == "open"
    with pytest.raises(gr.Unavailable):
        breaker.admit()


async def test_probe_runs_the_trial_itself_and_closes_when_it_answers() -> None:
    answers = [outage(), outage(), None]
    probes: list[float] = []

    async def probe() -> None:
        probes.append(anyio.current_time())
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    breaker = Breaker(
        gr.BreakerSettings(fail_max=1, reset_timeout=30, probe=probe, probe_interval=0.05)
    )
    opened = anyio.current_time()
    breaker.record(breaker.admit(), outage())
    assert breaker.state == "open"
    user_calls = 0
    with anyio.fail_after(5):
        while breaker.state != "closed":
            # No user request is ever let through as a trial while the probe works.
            with pytest.raises(gr.Unavailable):
                breaker.admit()
            user_calls += 1
            await anyio.sleep(0.005)
    assert len(probes) == 3
    # Each probe waits one probe_interval after the (re)opening before it; none waits
    # for reset_timeout (30 s).
    assert probes[0] - opened >= 0.05
    assert probes[1] - probes[0] >= 0.05
    assert user_calls > 0
    assert breaker.admit() is None
    snapshot = breaker.snapshot()
    assert (snapshot["state"], snapshot["trial_in_flight"]) == ("closed", False)
    await breaker.aclose()


async def test_a_probe_that_hangs_is_cut_off_by_probe_timeout() -> None:
    calls = 0

    async def probe() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.sleep(60)

    breaker = Breaker(
        gr.BreakerSettings(
            fail_max=1, reset_timeout=30, probe=probe, probe_timeout=0.05, probe_interval=0.02
        )
    )
    breaker.record(breaker.admit(), outage())
    with anyio.fail_after(5):
        while breaker.state != "closed":
            await anyio.sleep(0.01)
    assert calls == 2
    await breaker.aclose()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fail_max": 0}, "fail_max must be >= 1"),
        ({"reset_timeout": -1}, "reset_timeout must be a positive number"),
        ({"reset_timeout": "30"}, "reset_timeout must be a number of seconds"),
        ({"probe": "SELECT 1"}, "probe must be an async callable"),
        ({"probe_timeout": float("inf")}, "probe_timeout must be a positive number"),
        ({"probe_interval": 0}, "probe_interval must be a positive number"),
    ],
)
def test_bad_settings_say_what_to_change(settings: dict[str, object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        gr.BreakerSettings(**settings)  # type: ignore[arg-type]
