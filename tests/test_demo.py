"""``guardrails demo``: a short real run of both variants, and the flags' error messages."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import pytest

from guardrails.tools.demo import add_arguments, run
from guardrails.tools.demo.chart import in_flight_series
from guardrails.tools.demo.load import Arrival, Outcome, Profile, Progress, schedule
from guardrails.tools.demo.runner import progress_line, run_demo


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="guardrails demo")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_demo_keeps_answering_with_guardrails_where_the_unguarded_app_stalls(
    tmp_path: Path,
) -> None:
    # Bursts of 40 dashboards/s are over three times what 5 connections x 400 ms serve;
    # pool_timeout=1 keeps the unguarded run's hang short.
    output = tmp_path / "out"
    flags = ["--duration", "3", "--rate", "40", "--pool-timeout", "1", "--seed", "7"]
    args = _parse([*flags, "--output", str(output)])
    out = io.StringIO()

    result = run_demo(args, out)

    unguarded, guarded = result.unguarded, result.guarded
    assert unguarded.sent == guarded.sent == len(result.guarded_outcomes) > 60
    # The table's counts are the requests' own outcomes, not figures from elsewhere.
    for stats, outcomes in (
        (unguarded, result.unguarded_outcomes),
        (guarded, result.guarded_outcomes),
    ):
        assert stats.ok == sum(1 for o in outcomes if o.status is not None and o.status < 300)
        assert stats.stale == sum(1 for o in outcomes if o.stale)
        assert stats.shed == sum(1 for o in outcomes if o.status == 503)
        assert stats.server_errors == sum(1 for o in outcomes if o.status == 500)
    # Without guardrails the pool's timeout is the only brake: users wait it out, then 500.
    assert unguarded.server_errors > 0
    assert unguarded.pool_timeouts is not None
    assert unguarded.pool_timeouts >= unguarded.server_errors
    assert unguarded.error_p50_ms is not None
    assert unguarded.error_p50_ms >= 1000
    assert unguarded.shed == unguarded.stale == 0
    # With guardrails no 500 reaches a client: excess dashboards get the last good page,
    # everything else refused gets a usable 503.
    assert guarded.server_errors == 0
    assert guarded.other == 0
    assert all(o.status != 500 for o in result.guarded_outcomes)
    assert guarded.stale > 0
    assert guarded.stale_served == guarded.stale
    assert all(o.arrival.path == "/dashboard" for o in result.guarded_outcomes if o.stale)
    assert guarded.shed_malformed == 0
    assert guarded.limiter_in_flight == 0
    assert guarded.limiter_queued == 0
    assert guarded.breaker_transitions is not None
    assert guarded.job_failed == 0
    assert guarded.goodput >= unguarded.goodput
    assert guarded.p99_ms < unguarded.p99_ms
    assert guarded.login_p99_ms is not None
    assert unguarded.login_p99_ms is not None
    assert guarded.login_p99_ms < unguarded.login_p99_ms
    # Open loop: both runs sent the same seeded schedule, every request of it, none before
    # it was due, and each latency counts from the due time, so a client that fell behind
    # adds its lateness to the latencies instead of hiding the server's stalls.
    arrivals = schedule(Profile(duration=3, burst_rate=40), seed=7)
    for outcomes in (result.unguarded_outcomes, result.guarded_outcomes):
        assert [o.arrival for o in outcomes] == arrivals
        assert all(0 <= o.lag <= o.latency for o in outcomes)

    text = out.getvalue()
    assert "limiter in-flight after" in text
    assert f"{unguarded.server_errors:,} requests waited" in text
    assert "with guardrails: 0 errors" in text
    # Not a terminal: plain progress lines, no carriage returns or escape codes.
    assert "\r" not in text
    assert "\x1b" not in text

    assert result.chart == output / "demo.png"
    assert result.chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"written: {output / 'demo.png'}" in text
    assert result.csv is not None
    assert result.json is not None
    with result.csv.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == unguarded.sent + guarded.sent
    assert sum(1 for row in rows if row["kind"] == "stale") == guarded.stale
    document = json.loads(result.json.read_text())
    assert [run["ok"] for run in document["runs"]] == [unguarded.ok, guarded.ok]


def test_in_flight_counts_each_request_from_send_to_answer() -> None:
    arrivals = [Arrival(0.0, "GET", "/a"), Arrival(0.5, "GET", "/b"), Arrival(2.0, "GET", "/c")]
    outcomes = [
        Outcome(arrivals[0], 200, latency=1.0, lag=0.0),
        Outcome(arrivals[1], 200, latency=0.5, lag=0.0),
        Outcome(arrivals[2], None, latency=0.25, lag=0.0, error="ReadTimeout"),
    ]

    times, counts = in_flight_series(outcomes)

    # Both earlier requests end at 1.0 s: the count drops straight to 0, never below.
    assert list(zip(times, counts, strict=True)) == [
        (0.0, 0),
        (0.0, 1),
        (0.5, 2),
        (1.0, 1),
        (1.0, 0),
        (2.0, 1),
        (2.25, 0),
    ]
    assert [o.kind for o in outcomes] == ["ok", "ok", "client timeout"]


def test_progress_is_a_bar_on_a_terminal_and_plain_words_elsewhere() -> None:
    progress = Progress(total=100, sent=40, done=30, started_at=10.0)

    bar = progress_line("  [1/2] x", progress, duration=4.0, now=12.0, bar=True)
    plain = progress_line("  [1/2] x", progress, duration=4.0, now=12.0, bar=False)
    after = progress_line("  [1/2] x", progress, duration=4.0, now=20.0, bar=False)

    assert "[" + "#" * 12 + "." * 12 + "]" in bar
    assert plain == "  [1/2] x:  2.0/4 s, sent 40/100, answered 30, waiting 10"
    assert "load sent, waiting for the last answers" in after


def test_run_reports_a_database_that_cannot_be_reached(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 on loopback refuses at once: the demo must say so and exit non-zero, and the
    # password in the URL must not be echoed anywhere.
    args = _parse(["--database-url", "postgresql+asyncpg://demo:s3cret@127.0.0.1:1/demo"])

    assert run(args) == 1

    captured = capsys.readouterr()
    assert "the demo server did not become ready" in captured.err
    assert "s3cret" not in captured.out + captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "0"], "argument --duration: must be between 1 and 600 seconds, not 0"),
        (["--rate", "fast"], "argument --rate: must be a number"),
        (["--pool-timeout", "nan"], "argument --pool-timeout: must be between"),
        (["--database-url", "postgresql://x@127.0.0.1/db"], "postgresql+asyncpg://"),
        (["--seed", "x"], "invalid int value"),
    ],
)
def test_bad_flags_are_refused_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _parse(argv)

    assert exited.value.code == 2
    assert message in capsys.readouterr().err
