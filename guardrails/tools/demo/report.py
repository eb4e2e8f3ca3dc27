"""Renders the runs' ``RunStats`` as a side-by-side plain-text table and a conclusion.

Every word of the conclusion is chosen from the numbers, so a run that goes differently
reads differently.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence

from guardrails.tools.demo.stats import RunStats

__all__ = ["conclusion", "notes", "table"]

_LAG_WARNING_MS = 100.0


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _guarded_only(value: int | None, stats: RunStats) -> str:
    return _count(value) if stats.guarded else "-"


def _shed(reason: str) -> Callable[[RunStats], str]:
    return lambda s: _count(s.shed_by_error.get(reason, 0))


def _server_errors(s: RunStats) -> str:
    return _count(s.server_errors)


def _job(s: RunStats) -> str:
    if s.job_ok is None or s.job_failed is None:
        return "-"
    return f"{s.job_ok:,} / {s.job_failed:,}"


_ROWS: list[tuple[str, Callable[[RunStats], str]]] = [
    ("requests sent", lambda s: _count(s.sent)),
    ("2xx answered", lambda s: _count(s.ok)),
    ("  of which stale dashboards", lambda s: _count(s.stale)),
    ("goodput (2xx/s)", lambda s: f"{s.goodput:.1f}"),
    ("  fresh 2xx/s", lambda s: f"{s.fresh_goodput:.1f}"),
    ("latency p50 (ms)", lambda s: _ms(s.p50_ms)),
    ("latency p95 (ms)", lambda s: _ms(s.p95_ms)),
    ("latency p99 (ms)", lambda s: _ms(s.p99_ms)),
    ("longest stall (ms)", lambda s: _ms(s.max_ms)),
    ("2xx latency p50 (ms)", lambda s: _ms(s.ok_p50_ms)),
    ("2xx latency p99 (ms)", lambda s: _ms(s.ok_p99_ms)),
    ("login p99 (ms)", lambda s: _ms(s.login_p99_ms)),
    ("500 errors", _server_errors),
    ("pool timeouts (server log)", lambda s: _count(s.pool_timeouts)),
    ("503 overloaded", _shed("overloaded")),
    ("503 unavailable", _shed("unavailable")),
    ("503 read_only", _shed("read_only")),
    ("503 timeout", _shed("timeout")),
    ("client timeouts / no answer", lambda s: _count(s.other)),
    ("503 latency p99 (ms)", lambda s: _ms(s.shed_p99_ms)),
    ("breaker transitions", lambda s: _transitions(s)),
    ("background job ok / failed", _job),
    ("limiter in-flight after", lambda s: _guarded_only(s.limiter_in_flight, s)),
    ("client send lag max (ms)", lambda s: _ms(s.max_lag_ms)),
]


def _transitions(s: RunStats) -> str:
    if s.breaker_transitions is None:
        return "-"
    total = sum(s.breaker_transitions.values())
    if not total:
        return "0"
    parts = ", ".join(f"{n} {state}" for state, n in sorted(s.breaker_transitions.items()))
    return f"{total} ({parts})"


def table(runs: Sequence[RunStats]) -> str:
    """The runs side by side, one column each, numbers right-aligned."""
    label_width = max(len(label) for label, _ in _ROWS)
    cells = [[render(stats) for stats in runs] for _, render in _ROWS]
    widths = [
        max(len(stats.label), *(len(row[i]) for row in cells)) for i, stats in enumerate(runs)
    ]
    gap = "   "

    def line(label: str, values: Sequence[str]) -> str:
        return label.ljust(label_width) + "".join(
            gap + value.rjust(width) for value, width in zip(values, widths, strict=True)
        )

    lines = [line("", [s.label for s in runs]), line("", ["-" * w for w in widths])]
    lines.extend(line(label, row) for (label, _), row in zip(_ROWS, cells, strict=True))
    return "\n".join(lines)


def _seconds(ms: float | None) -> str:
    if ms is None or math.isnan(ms):
        return "-"
    return f"{ms / 1000:.1f} s" if ms >= 1000 else f"{ms:.0f} ms"


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _unguarded_sentence(s: RunStats) -> str:
    parts: list[str] = []
    if s.server_errors:
        who, waited = _plural(s.server_errors, "request"), _seconds(s.error_p50_ms)
        if s.pool_timeouts:
            parts.append(f"{who} waited {waited} for a pool connection and failed with 500")
        else:
            parts.append(f"{who} failed with 500 after {waited}")
    if s.other:
        parts.append(f"{_plural(s.other, 'request')} got no answer or an unexpected one")
    if not parts:
        parts.append("0 errors")
    if s.ok:
        parts.append(
            f"the {s.ok:,} that succeeded took p50 {_seconds(s.ok_p50_ms)}, "
            f"p99 {_seconds(s.ok_p99_ms)}"
        )
    if s.login_p99_ms is not None:
        parts.append(f"logins p99 {_seconds(s.login_p99_ms)}")
    return "; ".join(parts)


_REASONS = {
    "queue_timeout": "after their time in the queue ran out",
    "queue_full": "at once because the queue was full",
    "deadline": "at their deadline",
    "evicted": "pushed out of the queue by more important work",
}


def _refused_sentence(s: RunStats) -> str:
    refused = s.limiter_shed_total if s.limiter_shed_total is not None else s.shed
    why = [
        f"{count:,} {_REASONS.get(reason, reason)}"
        for reason, count in sorted(s.shed_by_reason.items(), key=lambda item: -item[1])
        if count
    ]
    sentence = f"{_plural(refused, 'request')} were not let wait" + (
        f" ({', '.join(why)})" if why else ""
    )
    answers = []
    if s.stale:
        answers.append(
            f"{_plural(s.stale, 'dashboard')} got the last good page, marked stale, "
            f"in p99 {_seconds(s.stale_p99_ms)}"
        )
    if s.shed:
        retry = "/".join(str(r) for r in s.retry_after) if s.retry_after else "(missing)"
        answers.append(
            f"{_plural(s.shed, 'request')} got 503 + Retry-After: {retry} "
            f"in p50 {_seconds(s.shed_p50_ms)}, p99 {_seconds(s.shed_p99_ms)}"
        )
    return sentence + (": " + " and ".join(answers) if answers else "")


def _guarded_sentence(s: RunStats) -> str:
    parts = [_plural(s.server_errors + s.other, "error")]
    if s.shed or s.stale or s.limiter_shed_total:
        parts.append(_refused_sentence(s))
    if s.fresh:
        parts.append(
            f"the {s.fresh:,} run fresh took p50 {_seconds(s.fresh_p50_ms)}, "
            f"p99 {_seconds(s.fresh_p99_ms)}"
        )
    if s.login_p99_ms is not None:
        parts.append(f"logins p99 {_seconds(s.login_p99_ms)}")
    return "; ".join(parts)


def conclusion(unguarded: RunStats, guarded: RunStats, *, width: int = 96) -> str:
    """A plain-language verdict per run, worded from the numbers, wrapped to ``width``."""
    verdicts = [
        f"{unguarded.label}: {_unguarded_sentence(unguarded)}.",
        f"{guarded.label}: {_guarded_sentence(guarded)}.",
    ]
    return "\n".join(textwrap.fill(v, width, subsequent_indent="    ") for v in verdicts)


def notes(runs: Sequence[RunStats]) -> list[str]:
    """Warnings about anything that makes the numbers less trustworthy or shows a defect."""
    found: list[str] = []
    for s in runs:
        if s.max_lag_ms > _LAG_WARNING_MS:
            found.append(
                f"note: in the run {s.label} the load generator fell up to "
                f"{s.max_lag_ms:,.0f} ms behind schedule (a busy machine?); latencies include it"
            )
        if s.shed_malformed:
            found.append(
                f"warning: in the run {s.label} {_plural(s.shed_malformed, '503 response')} "
                "lacked an integer Retry-After or the overloaded JSON body"
            )
        if s.guarded and s.limiter_in_flight:
            found.append(
                f"warning: the limiter still counts {s.limiter_in_flight} requests in flight "
                "after the run: a slot leaked"
            )
    return found
