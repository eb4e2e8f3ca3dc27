"""The ``guardrails budget`` command: output, warnings, --json and exit statuses."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from typing import Any

import pytest

from guardrails.tools.cli import main

DESIGN = ["budget", "--max-connections", "100", "--reserved", "10", "--processes", "4"]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], status: int) -> dict[str, Any]:
    assert main([*argv, "--json"]) == status
    out, err = capsys.readouterr()
    assert err == ""
    result: dict[str, Any] = json.loads(out)
    return result


def test_budget_prints_the_arithmetic_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(DESIGN) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "= 90 usable" in lines
    assert "= 63 app total" in lines
    assert "= 15 per process rounded down from 15.75" in lines
    assert "Per-process cap: 15 connections." in lines
    assert "warning" not in out


def test_a_pool_that_fits_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*DESIGN, "--pool-size", "10", "--max-overflow", "5"]) == 0
    out = capsys.readouterr().out
    assert (
        "OK: pool size 15 per process x 4 = 60 connections fits the budget of 63 "
        "(15 per process)." in out
    )


def test_a_pool_that_does_not_fit_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*DESIGN, "--pool-size", "20"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: pool_size 20 (+ max_overflow 0) per process x 4 processes = 80" in out
    assert "Set pool_size to at most 15" in out


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    result = _json(capsys, [*DESIGN, "--other", "jobs=5", "admin=3", "--pool-size", "20"], status=1)
    assert result["ok"] is False
    assert result["error"].startswith("pool_size 20 (+ max_overflow 0) per process x 4 processes")
    assert result["other_consumers"] == {"jobs": 5, "admin": 3}
    assert (result["usable"], result["app_total"], result["per_process"]) == (90, 57, 14)
    assert result["pool_size"] == 20
    assert result["warnings"] == []

    result = _json(capsys, [*DESIGN, "--pool-size", "15"], status=0)
    assert result["ok"] is True
    assert result["error"] is None
    assert (result["app_total"], result["per_process"], result["processes"]) == (63, 15, 4)


def test_other_can_be_repeated(capsys: pytest.CaptureFixture[str]) -> None:
    result = _json(capsys, [*DESIGN, "--other", "jobs=5", "--other", "admin=3"], status=0)
    assert result["other_consumers"] == {"jobs": 5, "admin": 3}


def test_serverless_instances_are_multiplied(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["budget", "--max-connections", "100", "--reserved", "3", "--instances", "50"]
    result = _json(capsys, [*argv, "--pool-size", "5"], status=1)
    assert (result["instances"], result["processes"], result["per_process"]) == (50, 50, 1)
    assert "x 50 processes = 250 connections" in result["error"]
    [warning] = result["warnings"]
    assert warning.startswith(
        "serverless: 50 instances x pool size 5 = 250 connections at peak, more than "
        "max_connections 100 itself, against a budget of 67"
    )
    assert "pool of at most 1, cap the instances at 13" in warning

    assert main(argv) == 0  # no pool size: show what fits
    out = capsys.readouterr().out
    assert "Per-process cap: 1 connection." in out
    assert "--instances 50: each serverless instance counts as a process" in out


def test_classic_mistakes_are_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["budget", "--max-connections", "100", "--target-utilization", "1"]
    result = _json(capsys, [*argv, "--pool-size", "100"], status=0)
    warnings = result["warnings"]
    assert len(warnings) == 3
    assert warnings[0].startswith("pool size 100 is not below max_connections 100")
    assert warnings[1].startswith("target utilization 1 leaves no headroom")
    assert "old and new processes run side by side" in warnings[1]
    assert warnings[2].startswith("reserved is 0")

    assert main([*argv, "--pool-size", "100"]) == 0
    out = capsys.readouterr().out
    assert "warning: target utilization 1 leaves no headroom" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--max-connections", "100", "--reserved", "120"],
            "guardrails budget: error: reserved (120) must be smaller than max_connections "
            "(100): lower reserved or raise max_connections",
        ),
        (
            ["--max-connections", "100", "--processes", "80"],
            "guardrails budget: error: 70 connections (floor(100 max_connections x 0.7 target "
            "utilization)) shared by 80 processes is less than 1 per process",
        ),
        (
            ["--max-connections", "lots"],
            "guardrails budget: error: argument --max-connections: must be a whole number >= 1, "
            "not 'lots'",
        ),
        (
            ["--max-connections", "100", "--target-utilization", "70"],
            "argument --target-utilization: must be a number above 0 and at most 1, not '70'",
        ),
        (
            ["--max-connections", "100", "--other", "jobs"],
            "argument --other: must be NAME=CONNECTIONS with a whole number >= 0, e.g. jobs=5",
        ),
        (
            ["--max-connections", "100", "--other", "jobs=1", "jobs=2"],
            "guardrails budget: error: --other jobs is given twice",
        ),
        (
            ["--max-connections", "100", "--processes", "2", "--instances", "3"],
            "argument --instances: not allowed with argument --processes",
        ),
        (["--reserved", "3"], "the following arguments are required: --max-connections"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["budget", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err
    assert "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert (
        capsys.readouterr().out == f"guardrails {importlib.metadata.version('asgi-guardrails')}\n"
    )


def test_the_entry_point_runs_as_a_real_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "guardrails", *DESIGN, "--pool-size", "20", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert (result["per_process"], result["ok"]) == (15, False)
