"""Writes a demo's raw results: every request as CSV, the options and figures as JSON.

So the table and the chart can be checked, re-plotted or compared with another run.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from guardrails.tools.demo.load import Outcome
from guardrails.tools.demo.options import DemoOptions
from guardrails.tools.demo.stats import RunStats

__all__ = ["CSV_COLUMNS", "write_csv", "write_json"]

CSV_COLUMNS = (
    "run",
    "scheduled_s",
    "method",
    "path",
    "route",
    "burst",
    "status",
    "kind",
    "latency_ms",
    "send_lag_ms",
    "stale",
    "reason",
    "retry_after",
    "error",
)
"""The CSV's header: one row per request, in due order within each run."""


def write_csv(runs: Sequence[tuple[str, Sequence[Outcome]]], path: Path) -> Path:
    """Write every outcome of ``runs`` (label and outcomes each) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for label, outcomes in runs:
            for o in outcomes:
                writer.writerow(
                    (
                        label,
                        f"{o.arrival.at:.4f}",
                        o.arrival.method,
                        o.arrival.path,
                        o.arrival.route,
                        int(o.arrival.burst),
                        "" if o.status is None else o.status,
                        o.kind,
                        f"{o.latency * 1000:.2f}",
                        f"{o.lag * 1000:.2f}",
                        int(o.stale),
                        o.reason or "",
                        "" if o.retry_after is None else o.retry_after,
                        o.error or "",
                    )
                )
    return path


def write_json(options: DemoOptions, runs: Sequence[RunStats], wall: float, path: Path) -> Path:
    """Write the options (the database URL without its password) and each run's figures."""
    settings = asdict(options)
    if options.database_url is not None:
        from sqlalchemy.engine import make_url

        url = make_url(options.database_url)
        settings["database_url"] = url.render_as_string(hide_password=True)
    document = {
        "options": settings,
        "wall_seconds": wall,
        "runs": [_run(stats) for stats in runs],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(document), indent=2) + "\n", encoding="utf-8")
    return path


def _run(stats: RunStats) -> dict[str, Any]:
    figures = asdict(stats)
    figures.update(
        goodput=stats.goodput,
        fresh=stats.fresh,
        fresh_goodput=stats.fresh_goodput,
        breaker_opened=stats.breaker_opened,
    )
    return figures


def _finite(value: Any) -> Any:
    # JSON has no NaN: an empty percentile becomes null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
