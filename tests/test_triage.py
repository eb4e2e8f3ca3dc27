"""Triage and early warnings on recorded sample series (the live shapes are in test_triage_db)."""

from __future__ import annotations

from dataclasses import replace

import psycopg
import pytest

import guardrails as gr
from guardrails.observe.triage import EarlyWarning, Sample, diagnose, early_warnings, queue_wait_p95


def series(n: int = 30, **changes: object) -> list[Sample]:
    """``n`` one-second samples of a quiet app; keyword values may be callables of i."""
    out = []
    for i in range(n):
        fields: dict[str, object] = {
            "at": float(i),
            "arrivals_total": 10 * i,
            "admitted_total": 10 * i,
            "in_flight": 1,
            "limit": 10,
            "queued": 0,
            "checked_out": 1,
            "pool_size": 10,
            "pool_timeouts_total": 0,
            "connects_total": 2,
            "leak_suspects_total": 0,
            "refused_total": 0,
            "retry_remaining": 10,
        }
        for name, value in changes.items():
            fields[name] = value(i) if callable(value) else value
        out.append(Sample(**fields))  # type: ignore[arg-type]
    return out


def test_a_quiet_app_is_none() -> None:
    assert diagnose(series()).kind == "none"
    assert diagnose(series(2)).kind == "none"  # too few samples to say anything


def test_busy_slots_and_sheds_that_track_traffic_are_exhaustion() -> None:
    samples = series(
        in_flight=10,
        checked_out=10,
        arrivals_total=lambda i: 40 * i,
        admitted_total=lambda i: 25 * i,
        pool_timeouts_total=lambda i: i // 5,
    )
    diagnosis = diagnose(samples)
    assert diagnosis.kind == "exhaustion"
    assert diagnosis.numbers["shed"] == 15 * 29
    assert diagnosis.numbers["busy_fraction"] == 1.0
    assert "all 10 slots busy" in diagnosis.evidence


def test_connections_held_without_requests_while_traffic_is_flat_are_a_leak() -> None:
    samples = series(in_flight=1, checked_out=lambda i: 1 + i // 3)
    diagnosis = diagnose(samples)
    assert diagnosis.kind == "leak"
    assert diagnosis.numbers["checked_out"] == 10
    assert diagnosis.numbers["in_flight"] == 1
    assert "checked out while only 1 request(s) are in flight" in diagnosis.evidence


def test_a_leak_is_not_confused_with_traffic_growing() -> None:
    # Checked-out grows with in-flight requests: that is load, not a leak.
    samples = series(
        in_flight=lambda i: 1 + i // 3,
        checked_out=lambda i: 1 + i // 3,
        arrivals_total=lambda i: i * i,
        admitted_total=lambda i: i * i,
    )
    assert diagnose(samples).kind != "leak"


def test_leak_suspects_alone_say_leak() -> None:
    samples = series(leak_suspects_total=lambda i: 1 if i > 20 else 0)
    assert diagnose(samples).kind == "leak"


def test_refused_connections_or_a_connect_flood_are_a_storm() -> None:
    refused = series(refused_total=lambda i: i, pool_timeouts_total=lambda i: i)
    assert diagnose(refused).kind == "storm"  # wins over the exhaustion it also causes
    flood = series(connects_total=lambda i: 5 * i)
    diagnosis = diagnose(flood)
    assert diagnosis.kind == "storm"
    assert diagnosis.numbers["connects"] == 5 * 29


def test_only_the_window_counts() -> None:
    old_trouble = series(60, pool_timeouts_total=lambda i: i if i < 20 else 20)
    assert diagnose(old_trouble, window=30).kind == "none"
    assert diagnose(old_trouble, window=60).kind == "exhaustion"


def test_queue_wait_p95_counts_immediate_admits_as_zero() -> None:
    window = series(2, admitted_total=lambda i: 100 * i)  # 100 admitted in the window
    assert queue_wait_p95(window, [0.5] * 4) == 0.0  # 96 waited 0: p95 is 0
    assert queue_wait_p95(window, [0.5] * 10) == 0.5


def test_early_warnings() -> None:
    settings = EarlyWarning(utilization=0.8, sustained=10, window=10)
    busy = series(20, in_flight=9, admitted_total=lambda i: 10 * i)
    found = early_warnings(
        busy, settings, queue_timeout=1.0, recent_queue_waits=[0.9] * 50, acquire_p95=0.3
    )
    assert [w.check for w in found] == ["queue_wait_p95", "acquire_wait_p95", "utilization"]
    assert found[2].observed == 0.9
    spent = [replace(s, retry_remaining=0) for s in series(5)]
    quiet = early_warnings(
        spent, settings, queue_timeout=1.0, recent_queue_waits=[], acquire_p95=None
    )
    assert [w.check for w in quiet] == ["retry_budget"]


def test_utilization_must_hold_for_the_whole_window() -> None:
    settings = EarlyWarning(sustained=10, window=10)
    dips = series(20, in_flight=lambda i: 3 if i == 15 else 9)
    assert (
        early_warnings(dips, settings, queue_timeout=1.0, recent_queue_waits=[], acquire_p95=None)
        == []
    )


def test_refused_as_too_many_walks_the_chain() -> None:
    from guardrails.observe.triage import refused_as_too_many

    inner = psycopg.errors.TooManyConnections("sorry, too many clients already")  # 53300
    outer = RuntimeError("could not connect")
    outer.__cause__ = inner
    assert refused_as_too_many(outer)
    assert not refused_as_too_many(KeyError("nope"))
    # By SQLSTATE only: words in a message say nothing.
    assert not refused_as_too_many(OSError("FATAL: sorry, too many clients already"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"utilization": 1.5}, "utilization must be above 0 and at most 1"),
        ({"window": 0}, "window must be a positive number"),
        ({"queue_wait_p95": -1}, "queue_wait_p95 must be > 0"),
    ],
)
def test_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EarlyWarning(**kwargs)
    with pytest.raises(TypeError, match="early_warning must be"):
        gr.Guardrails(concurrency=2, early_warning=kwargs)  # type: ignore[arg-type]
