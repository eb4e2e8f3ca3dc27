"""Read retries: which errors, how many, how long, and the budget that caps them."""

from __future__ import annotations

import anyio
import psycopg
import pytest
from tenacity import RetryCallState

import guardrails as gr
from guardrails.retry import RetryBudget, call_with_retries, retrying

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def classify(exc: BaseException) -> gr.ErrorKind:
    return gr.classify(exc)


def outage(message: str = "connection failed") -> BaseException:
    """What psycopg raises for a connection that failed: an outage by its type."""
    return psycopg.OperationalError(message)


class Flaky:
    """An async callable failing with ``errors`` in turn, then returning ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


FAST = gr.RetrySettings(attempts=4, base_delay=0.001, max_delay=0.002)


def budget(settings: gr.RetrySettings = FAST, clock: Clock | None = None) -> RetryBudget:
    return RetryBudget(
        settings.budget_ratio,
        settings.budget_window,
        settings.budget_min_retries,
        **({"clock": clock} if clock else {}),
    )


async def test_outages_and_transient_errors_are_retried_until_success() -> None:
    flaky = Flaky(outage(), psycopg.errors.SerializationFailure("40001"))
    assert await call_with_retries(flaky, FAST, budget(), classify) == "ok"
    assert flaky.calls == 3


async def test_app_errors_and_guardrails_errors_are_not_retried() -> None:
    for error in (KeyError("app"), gr.Unavailable("breaker open", retry_after=3)):
        flaky = Flaky(error)
        with pytest.raises(type(error)):
            await call_with_retries(flaky, FAST, budget(), classify)
        assert flaky.calls == 1


async def test_at_most_attempts_tries_then_the_last_error() -> None:
    errors = [outage(f"try {i}") for i in range(10)]
    flaky = Flaky(*errors)
    with pytest.raises(psycopg.OperationalError, match="try 3"):
        await call_with_retries(flaky, FAST, budget(), classify)
    assert flaky.calls == 4


async def test_no_sleep_runs_past_the_time_left() -> None:
    settings = gr.RetrySettings(attempts=10, base_delay=0.2, max_delay=0.2)
    flaky = Flaky(*[outage() for _ in range(10)])
    slept: list[tuple[float, float]] = []

    def note(state: RetryCallState) -> None:
        assert state.seconds_since_start is not None
        slept.append((state.seconds_since_start, state.upcoming_sleep))

    async def read() -> None:
        retries = budget(settings)
        async for attempt in retrying(settings, retries, classify, time_left=0.05, on_retry=note):
            with attempt:
                await flaky()

    with pytest.raises(psycopg.OperationalError):
        await read()
    # Full jitter draws sleeps in [0, 0.2]; a sleep that would end past 0.05 s after the
    # first try is not taken: the last error is raised instead.
    assert len(slept) == flaky.calls - 1  # one sleep before each retry, none after the last
    assert all(since + sleep < 0.05 for since, sleep in slept)
    assert 0 < flaky.calls < 10


async def test_no_time_left_makes_the_first_error_final() -> None:
    flaky = Flaky(ConnectionResetError(), ConnectionResetError())
    with pytest.raises(ConnectionResetError):
        await call_with_retries(flaky, FAST, budget(), classify, time_left=0)
    assert flaky.calls == 1


async def test_cancellation_is_never_retried() -> None:
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await anyio.sleep(60)

    with anyio.move_on_after(0.05) as scope:
        await call_with_retries(hangs, FAST, budget(), classify)
    assert scope.cancelled_caught
    assert calls == 1


def test_budget_allows_the_floor_plus_a_ratio_of_calls() -> None:
    clock = Clock()
    retries = RetryBudget(0.1, 10.0, 2, clock=clock)
    for _ in range(50):
        retries.record_call()
    allowed = 0
    while retries.can_retry():
        retries.record_retry()
        allowed += 1
    assert allowed == 2 + 5  # floor + 10% of 50 calls
    assert retries.remaining() == 0


def test_budget_window_slides() -> None:
    clock = Clock()
    retries = RetryBudget(0.5, 10.0, 0, clock=clock)
    for _ in range(10):
        retries.record_call()
    for _ in range(5):
        retries.record_retry()
    assert not retries.can_retry()
    clock.now += 5  # half the window later: the old calls and retries still count
    assert not retries.can_retry()
    for _ in range(2):
        retries.record_call()
    assert retries.can_retry()  # 12 calls allow 6
    clock.now += 10.01  # everything from before has left the window
    assert retries.remaining() == 0
    assert retries.snapshot()["calls_total"] == 12


async def test_a_failing_dependency_sees_at_most_one_plus_ratio_times_the_calls() -> None:
    settings = gr.RetrySettings(
        attempts=5, base_delay=0.0001, max_delay=0.0002, budget_ratio=0.1, budget_min_retries=3
    )
    retries = budget(settings)
    attempts = 0

    async def down() -> None:
        nonlocal attempts
        attempts += 1
        raise outage()

    calls = 200
    for _ in range(calls):
        with pytest.raises(psycopg.OperationalError):
            await call_with_retries(down, settings, retries, classify)
    assert calls < attempts <= calls + 3 + calls * 0.1
    assert retries.retries_total == attempts - calls
    assert retries.denied_total > 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"attempts": 0}, "attempts must be >= 1"),
        ({"budget_ratio": 2}, "budget_ratio must be between 0 and 1"),
        ({"base_delay": 2, "max_delay": 1}, "max_delay .* must be >= base_delay"),
        ({"base_delay": -1}, "base_delay must be a positive number"),
        ({"attempts": 2.5}, "attempts must be a whole number"),
    ],
)
def test_bad_settings_say_what_to_change(settings: dict[str, object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        gr.RetrySettings(**settings)  # type: ignore[arg-type]
