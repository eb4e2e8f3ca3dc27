"""guardrails.testing: the breaker's manual clock, instant retries, the opt-in pytest plugin."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import pytest
from psycopg import OperationalError

import guardrails as gr
import guardrails.testing
from guardrails.retry import backoff
from guardrails.testing import InstantRetries, ManualClock, breaker_clock, instant_retries

OUTAGE = OperationalError("connection failed")


def test_the_public_surface() -> None:
    assert guardrails.testing.__all__ == [
        "ChaosMiddleware",
        "ChaosRule",
        "DatabaseFault",
        "FaultTransport",
        "InstantRetries",
        "ManualClock",
        "breaker_clock",
        "database_down",
        "flaky_database",
        "instant_retries",
        "slow_database",
    ]
    for name in guardrails.testing.__all__:
        assert getattr(guardrails.testing, name).__doc__, name
    # Users import it on purpose: nothing of it is in the main namespace.
    assert not set(guardrails.testing.__all__) & set(gr.__all__)


# -- the clock ------------------------------------------------------------------------------


def test_a_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(100.0)
    assert clock() == clock.now() == 100.0
    assert clock.advance(2.5) == 102.5
    assert clock.advance(timedelta(seconds=1)) == 103.5
    assert clock() == 103.5
    with pytest.raises(ValueError, match="positive number of seconds"):
        clock.advance(-1)


def test_the_open_period_passes_on_the_manual_clock() -> None:
    guard = gr.Guardrails(concurrency=1, breaker=gr.BreakerSettings(fail_max=1, reset_timeout=30))
    breaker = guard.breaker
    real = breaker.clock
    with breaker_clock(guard) as clock:
        breaker.record(breaker.admit(), OUTAGE)
        assert (breaker.state, breaker.retry_after) == ("open", 30)
        clock.advance(29)
        assert breaker.retry_after == 1
        with pytest.raises(gr.Unavailable):
            breaker.admit()
        clock.advance(1)
        trial = breaker.admit()  # the open period is over: a half-open trial
        assert trial is not None
        assert breaker.state == "half_open"
        breaker.record(trial)
        assert breaker.state == "closed"
    assert breaker.clock is real


def test_the_clock_goes_on_from_the_breakers_reading() -> None:
    now = [500.0]
    breaker = gr.Breaker(gr.BreakerSettings(fail_max=1, reset_timeout=10), clock=lambda: now[0])
    breaker.record(breaker.admit(), OUTAGE)
    now[0] = 504.0  # four seconds into the open period
    with breaker_clock(breaker) as clock:
        assert clock() == 504.0
        assert breaker.retry_after == 6
        clock.advance(6)
        assert breaker.admit() is not None
    with pytest.raises(TypeError, match="Guardrails or Breaker"):
        breaker_clock("breaker").__enter__()  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        breaker.clock = 5  # type: ignore[assignment]


# -- instant retries -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_retries_do_not_sleep_and_the_waits_are_kept() -> None:
    guard = gr.Guardrails(
        concurrency=1,
        retry=gr.RetrySettings(attempts=3, base_delay=10.0, max_delay=60.0),
        breaker=gr.BreakerSettings(fail_max=10),
    )
    calls = 0

    @guard.read
    async def read() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise OUTAGE
        return "ok"

    with instant_retries() as retries, anyio.fail_after(5):
        assert await read() == "ok"
    assert calls == 3
    assert len(retries.waits) == 2
    # Full jitter between 0 and base_delay x 2**n, as configured: only the sleeping is gone.
    assert 0 <= retries.waits[0] <= 10.0
    assert 0 <= retries.waits[1] <= 20.0


@pytest.mark.anyio
async def test_restored_retries_sleep_again() -> None:
    retries = instant_retries()
    await backoff(30)  # returns at once
    retries.restore()
    retries.restore()  # a second restore does nothing
    assert retries.waits == [30]
    with anyio.move_on_after(0.01) as scope:
        await backoff(30)
    assert scope.cancelled_caught  # it slept, and was cut off


# -- the pytest plugin (opt-in) --------------------------------------------------------------


PLUGIN_TESTS = """
import guardrails as gr
from sqlalchemy import create_engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
import pytest

engine = create_engine("sqlite://")
GUARD = gr.Guardrails(concurrency=1)
GUARD.watch_pool(engine)


def test_outage(guardrails_outage, guardrails_clock, guardrails_instant_retries):
    clock = guardrails_clock(GUARD)
    fault = guardrails_outage(GUARD, open_breaker=True)
    assert GUARD.breaker.state == "open"
    with pytest.raises(PoolTimeout):
        engine.raw_connection()
    assert fault.refused == 1
    clock.advance(10)


def test_the_next_test_finds_all_undone():
    assert GUARD.breaker.state == "closed"
    assert GUARD.breaker.failures == 0
    assert GUARD.watchers[0].fault is None
    import time
    assert GUARD.breaker.clock is time.monotonic
    engine.raw_connection().close()
"""


def test_the_plugin_is_opt_in_and_undoes_everything(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plugin=PLUGIN_TESTS)
    # Without opting in, the fixtures do not exist.
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'guardrails_outage' not found*"])
    pytester.makeconftest('pytest_plugins = ["guardrails.testing.pytest_plugin"]\n')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_the_fixture_is_an_instant_retries_handle(
    guardrails_instant_retries: InstantRetries, guardrails_outage: Any
) -> None:
    assert isinstance(guardrails_instant_retries, InstantRetries)
    assert guardrails_instant_retries.waits == []
