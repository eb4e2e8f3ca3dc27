"""The per-request outcome: every verdict reaches the breaker once, every trial goes back."""

from __future__ import annotations

import pytest
import sqlalchemy.exc

import guardrails as gr
from guardrails.outcome import Outcome


def pool_timeout() -> BaseException:
    # The type SQLAlchemy's QueuePool raises when no connection frees up in time.
    return sqlalchemy.exc.TimeoutError("QueuePool limit reached")


def half_open_guard() -> tuple[gr.Guardrails, gr.breaker.Trial]:
    guard = gr.Guardrails(concurrency=2, breaker=gr.BreakerSettings(fail_max=2))
    guard.breaker.force_open(0)  # the open period is over: the next caller is the trial
    trial = guard.breaker.admit()
    assert trial is not None
    assert guard.breaker.state == "half_open"
    return guard, trial


def test_finish_closes_on_the_trial_and_is_safe_twice() -> None:
    guard, trial = half_open_guard()
    outcome = Outcome(guard, trial)
    outcome.finish()
    transitions = guard.breaker.transitions
    outcome.finish()
    outcome.abandon()
    assert (guard.breaker.state, guard.breaker.transitions) == ("closed", transitions)


def test_abandon_gives_the_trial_back_undecided() -> None:
    guard, trial = half_open_guard()
    Outcome(guard, trial).abandon()
    assert trial.done
    assert guard.breaker.state == "half_open"
    assert guard.breaker.admit() is not None  # the next caller may try


def test_a_pool_timeout_the_app_caught_counts_once() -> None:
    guard = gr.Guardrails(concurrency=2, breaker=gr.BreakerSettings(fail_max=3))
    outcome = Outcome(guard)
    outcome.pool_timed_out(pool_timeout())
    outcome.finish()
    outcome.finish()
    assert guard.breaker.failures == 1


def test_a_failure_a_guarded_call_recorded_is_not_counted_again_by_the_request() -> None:
    guard = gr.Guardrails(concurrency=2, breaker=gr.BreakerSettings(fail_max=3))
    outcome = Outcome(guard)
    exc = pool_timeout()
    trial = outcome.begin_call()
    outcome.call_failed(trial, exc)
    assert guard.breaker.failures == 1
    with pytest.raises(gr.Unavailable) as wrapped:
        raise gr.Unavailable("down") from exc
    assert outcome.fail(wrapped.value) is gr.ErrorKind.OUTAGE
    assert guard.breaker.failures == 1


def test_an_app_error_after_a_success_resets_nothing_it_did_not_prove() -> None:
    guard = gr.Guardrails(concurrency=2, breaker=gr.BreakerSettings(fail_max=3))
    guard.breaker.record(None, pool_timeout())
    outcome = Outcome(guard)
    outcome.pool_timed_out(pool_timeout())
    # The app turned the timeout into its own error: still one outage, not a success.
    assert outcome.fail(KeyError("rendered a 500")) is not gr.ErrorKind.OUTAGE
    assert guard.breaker.failures == 2
