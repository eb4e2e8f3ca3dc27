"""``guardrails demo``: a short real run of both variants, and the flags' error messages."""

from __future__ import annotations

import argparse
import io

import pytest

from guardrails.demo import add_arguments, run
from guardrails.demo.runner import run_demo


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="guardrails demo")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_demo_sheds_fast_with_guardrails_and_hangs_without() -> None:
    # 100 req/s is three times what 5 connections x 150 ms serve, so both runs are overloaded
    # within a second; pool_timeout=1 keeps the unguarded run's hang short.
    args = _parse(["--duration", "3", "--rate", "100", "--pool-timeout", "1", "--seed", "7"])
    out = io.StringIO()

    result = run_demo(args, out)

    unguarded, guarded = result.unguarded, result.guarded
    assert unguarded.sent == guarded.sent > 250
    # Without guardrails the pool's timeout is the only brake: users wait it out, then 500.
    assert unguarded.server_errors > 0
    assert unguarded.pool_timeouts == unguarded.server_errors
    assert unguarded.error_p50_ms is not None
    assert unguarded.error_p50_ms >= 1000
    assert unguarded.shed == 0
    # With guardrails nothing fails: the excess is refused quickly with a usable answer.
    assert guarded.server_errors == 0
    assert guarded.other == 0
    assert guarded.ok > 0
    assert guarded.shed > 0
    assert guarded.shed_malformed == 0
    assert guarded.retry_after
    assert guarded.limiter_shed_total == guarded.shed
    assert guarded.limiter_in_flight == 0
    assert guarded.limiter_queued == 0
    # Refusals come fast; without guardrails every error first waited out the pool timeout.
    assert guarded.shed_p50_ms is not None
    assert guarded.shed_p50_ms < unguarded.error_p50_ms / 2
    assert guarded.p50_ms < unguarded.p50_ms
    # The load generator kept to its schedule, so the latencies are the server's.
    assert max(unguarded.max_lag_ms, guarded.max_lag_ms) < 250

    text = out.getvalue()
    assert "limiter in-flight after" in text
    assert f"{unguarded.server_errors:,} requests waited" in text
    assert "with guardrails: 0 errors" in text


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
