"""Triage and early warnings on recorded sample series (the live shapes are in test_triage_db)."""

from __future__ import annotations

from dataclasses import replace

import psycopg
import pytest

import guardrails as gr
from guardrails.observe.triage import (
    BulkheadSample,
    EarlyWarning,
    Sample,
    diagnose,
    early_warnings,
    queue_wait_p95,
)


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
    # Each says what was measured and the threshold it crossed.
    assert [w.text for w in found] == [
        "requests wait 900 ms for a slot at p95 (warning above 500 ms)",
        "pool acquire p95 is 300 ms (warning above 100 ms)",
        "at least 90% of the slots busy for the last 10 s (warning at 80%)",
    ]
    assert [(w.observed, w.threshold) for w in found] == [(0.9, 0.5), (0.3, 0.1), (0.9, 0.8)]
    spent = [replace(s, retry_remaining=0) for s in series(5)]
    quiet = early_warnings(
        spent, settings, queue_timeout=1.0, recent_queue_waits=[], acquire_p95=None
    )
    assert [w.check for w in quiet] == ["retry_budget"]
    assert quiet[0].text == (
        "the retry budget is spent: 0 retries left (warning at 0): reads are not retried "
        "until calls outnumber retries again"
    )


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


def test_sheds_by_a_routes_own_max_concurrency_are_a_bulkhead_not_exhaustion() -> None:
    # 5 global slots, one busy; /reports/{name} has 2 slots of its own, always full, and
    # sheds 3 requests a second. The pool has room: nothing is exhausted.
    samples = series(
        9,
        limit=5,
        in_flight=2,
        arrivals_total=lambda i: 13 * i,
        admitted_total=lambda i: 10 * i,
        bulkheads=lambda i: (BulkheadSample("/reports/{name}", 2, 2, 3 * i),),
    )
    diagnosis = diagnose(samples)
    assert diagnosis.kind == "bulkhead"
    assert diagnosis.evidence == (
        "24 request(s) shed by routes' own max_concurrency in the last 8 s: "
        "/reports/{name} shed 24 (its 2 slot(s) full in 100%); all 5 global slots busy in "
        "0%: the pool is not exhausted, the sub-limit holds these routes back on purpose; "
        "if they need more, raise max_concurrency (it serves at most max_concurrency / "
        "hold time requests per second)"
    )
    assert diagnosis.numbers == {
        "bulkhead_shed": 24,
        "bulkhead_full_fraction": 1.0,
        "busy_fraction": 0.0,
    }


def test_exhaustion_counts_the_global_sheds_apart_from_a_bulkheads() -> None:
    samples = series(
        9,
        limit=5,
        in_flight=5,
        arrivals_total=lambda i: 15 * i,
        admitted_total=lambda i: 10 * i,
        bulkheads=lambda i: (BulkheadSample("/reports/{name}", 2, 2, 2 * i),),
    )
    diagnosis = diagnose(samples)
    assert diagnosis.kind == "exhaustion"
    assert (diagnosis.numbers["shed"], diagnosis.numbers["bulkhead_shed"]) == (24, 16)
    assert diagnosis.evidence.startswith(
        "all 5 slots busy in 100% of the last 8 s, 24 request(s) shed "
        "(and 16 by routes' own max_concurrency), 0 pool timeout(s), at 15.0 req/s"
    )


def test_an_open_breaker_refusing_requests_is_an_outage() -> None:
    # The breaker opened at 3 s and refused 145 requests; no request reached the limiter.
    samples = series(
        9,
        arrivals_total=30,
        admitted_total=30,
        breaker=lambda i: "open" if i >= 3 else "closed",
        outage_refused_total=lambda i: 0 if i < 3 else 145 * (i - 3) // 5,
        opened_by=lambda i: "OperationalError on /items/{id}" if i >= 3 else None,
    )
    assert samples[-1].outage_refused_total == 145
    diagnosis = diagnose(samples)
    assert diagnosis.kind == "outage"
    assert diagnosis.evidence == (
        "the circuit breaker was open or half-open in 67% of the last 8 s (now open) and "
        "145 request(s) were refused with 503 because the database was down; it opened on "
        "OperationalError on /items/{id}; 0 pool timeout(s): the database is down, "
        "restarting or unreachable (connections refused or dropped), not short of "
        "connections: look at the database; meanwhile requests are answered at once, and "
        "the breaker closes when it answers again"
    )
    assert diagnosis.numbers == {"refused": 145, "open_fraction": 0.667, "pool_timeouts": 0}


def test_refusals_after_the_breaker_closed_still_say_outage_for_the_window() -> None:
    samples = series(9, outage_refused_total=lambda i: 145 if i >= 2 else 0)
    diagnosis = diagnose(samples)
    assert diagnosis.kind == "outage"
    assert "in 0% of the last 8 s (now closed) and 145 request(s)" in diagnosis.evidence
    assert diagnose(samples[5:]).kind == "none"  # the window holds no refusal any more


def test_pool_timeouts_behind_an_outage_are_said() -> None:
    samples = series(
        9,
        breaker="open",
        pool_timeouts_total=lambda i: min(i, 5),
        outage_refused_total=lambda i: 4 * i,
        opened_by="TimeoutError on /reports/{name} (pool main)",
    )
    diagnosis = diagnose(samples)
    assert diagnosis.kind == "outage"
    assert diagnosis.evidence.endswith(
        "it opened on TimeoutError on /reports/{name} (pool main); 5 pool timeout(s): the "
        "pool could not hand out connections in time: slow queries, a leak, or a database "
        "that stopped answering"
    )


def test_a_storm_is_said_before_the_outage_it_causes() -> None:
    samples = series(9, refused_total=lambda i: i, breaker="open", outage_refused_total=40)
    assert diagnose(samples).kind == "storm"


def test_the_outage_names_what_first_opened_the_breaker_not_a_failed_probe() -> None:
    samples = series(
        9,
        breaker="open",
        outage_refused_total=lambda i: 10 * i,
        opened_by=lambda i: (
            "ConnectionRefusedError on /items/{id}"
            if i < 4
            else "ConnectionRefusedError in the recovery probe"
        ),
    )
    assert "it opened on ConnectionRefusedError on /items/{id};" in diagnose(samples).evidence


def test_an_adaptive_limit_lowered_by_slow_holds_is_a_slowdown_not_exhaustion() -> None:
    samples = series(
        limit=lambda i: 20 if i < 5 else 6,
        ceiling=20,
        in_flight=lambda i: 20 if i < 5 else 6,
        arrivals_total=lambda i: 40 * i,
        admitted_total=lambda i: 30 * i,
        baseline=0.021,
        hold=0.061,
    )
    diagnosis = diagnose(samples)
    assert diagnosis.kind == "slowdown"
    assert "slower than its baseline (slots held 61 ms against 21 ms)" in diagnosis.evidence
    assert "limit lowered from 20 to 6" in diagnosis.evidence
    assert diagnosis.numbers["shed"] == 10 * 29
    # The same series with a fixed limit of 6: every slot busy, so exhaustion.
    fixed = series(
        limit=6, in_flight=6, arrivals_total=lambda i: 40 * i, admitted_total=lambda i: 30 * i
    )
    assert diagnose(fixed).kind == "exhaustion"


def test_a_limit_lowered_for_a_moment_is_not_the_story_of_the_window() -> None:
    samples = series(limit=lambda i: 20 if i != 29 else 18, ceiling=20, baseline=0.02, hold=0.04)
    assert diagnose(samples).kind == "none"
