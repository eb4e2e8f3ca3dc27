"""Showing the report to people: aligned sections, the budget, then the checklist.

The small wording helpers (durations, counts of sessions, unnamed applications) are
shared with :mod:`guardrails.tools.doctor.checks`, so a reason and a table say a number
the same way.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable, Sequence

from guardrails.tools.doctor.model import (
    DoctorOptions,
    DoctorReport,
    Mark,
    StatementStats,
    state_label,
)

__all__ = ["render_text"]


def duration_text(ms: int) -> str:
    """A PostgreSQL timeout in milliseconds as people write it; 0 is no limit."""
    if ms == 0:
        return "0 (no limit)"
    if ms % 1000:
        return f"{ms} ms"
    seconds = ms // 1000
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def seconds_text(value: float) -> str:
    """Seconds with one decimal, or minutes from two minutes on."""
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def sessions_text(count: int) -> str:
    """``1 session``, ``2 sessions``."""
    return f"{count} session{'' if count == 1 else 's'}"


def name_text(value: str) -> str:
    """An application or user name, ``(none)`` when it is empty."""
    return value or "(none)"


def _counts(title: str, rows: Iterable[tuple[str, int]]) -> list[str]:
    rows = list(rows)
    if not rows:
        return [f"  {title}: none"]
    width = max(len(label) for label, _ in rows)
    digits = max(len(str(count)) for _, count in rows)
    return [f"  {title}:"] + [f"    {label:<{width}}  {count:>{digits}}" for label, count in rows]


def _table(rows: Sequence[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [f"{indent}{label:<{width}}  {value}" for label, value in rows]


def render_text(report: DoctorReport, *, width: int = 100) -> str:
    """The report for people: aligned sections, then the budget, then the checklist."""
    obs = report.observations
    server = obs.server
    activity = obs.activity
    lines = [
        f"PostgreSQL {server.version} at {report.url} "
        f'(database "{server.database}", user "{server.user}")',
        "",
        "Server settings:",
    ]
    settings = [
        ("max_connections", str(server.max_connections)),
        ("superuser_reserved_connections", str(server.superuser_reserved_connections)),
    ]
    if server.reserved_connections is not None:
        settings.append(("reserved_connections", str(server.reserved_connections)))
    settings += [
        ("statement_timeout", duration_text(server.statement_timeout_ms)),
        (
            "idle_in_transaction_session_timeout",
            duration_text(server.idle_in_transaction_session_timeout_ms),
        ),
    ]
    lines += _table(settings)
    lines += [
        "",
        f"Connections open now: {activity.total} of {server.max_connections} "
        "(this one not counted)",
    ]
    lines += _counts("by state", ((state_label(s), n) for s, n in activity.by_state))
    lines += _counts("by application", ((name_text(a), n) for a, n in activity.by_application))
    lines += _counts("by user", ((name_text(u), n) for u, n in activity.by_user))

    idle = obs.idle_in_transaction
    lines.append("")
    if idle.count:
        lines.append(
            f"Idle in transaction: {sessions_text(idle.count)}, the oldest for "
            f"{seconds_text(idle.oldest_seconds or 0.0)}"
        )
    else:
        lines.append("Idle in transaction: none")
    longest = obs.longest_query
    if longest is None:
        lines.append("Longest running query: none running")
    else:
        lines.append(
            f"Longest running query: {seconds_text(longest.seconds)} (pid {longest.pid}, user "
            f"{name_text(longest.user)}, application {name_text(longest.application)})"
        )
        lines.append(_query_line(longest.query))

    lines += ["", *_statement_lines(obs.statements, report.options)]
    lines.append("")
    if report.budget is not None:
        lines.append(report.budget.explain())
    else:
        lines.append(f"Connection budget: none fits: {report.budget_error}")
    lines += ["", "Checklist:"]
    name_width = max(len(check.name) for check in report.checks)
    for check in report.checks:
        head = f"  {check.mark.value:<4}  {check.name:<{name_width}}  "
        lines += textwrap.wrap(
            check.reason,
            width=max(width, len(head) + 30),
            initial_indent=head,
            subsequent_indent=" " * len(head),
            break_on_hyphens=False,
        )
    warned = sum(check.mark is Mark.WARN for check in report.checks)
    lines += [
        "",
        "All ok." if not warned else f"{warned} of {len(report.checks)} items to look at.",
    ]
    return "\n".join(lines)


def _query_line(query: str | None) -> str:
    if query is None:
        return "  (text hidden; pass --show-queries to print it)"
    return "  " + re.sub(r"\s+", " ", query).strip()


def _statement_lines(stats: StatementStats, options: DoctorOptions) -> list[str]:
    if stats.note:
        return [f"pg_stat_statements: {stats.note}"]
    if not stats.top:
        return ["pg_stat_statements: no statements recorded in this database yet"]
    lines = [f"Slowest statements by mean time (pg_stat_statements, top {len(stats.top)}):"]
    header = ("mean ms", "calls", "total ms", "queryid")
    rows = [
        (f"{s.mean_ms:.1f}", str(s.calls), f"{s.total_ms:.1f}", str(s.queryid)) for s in stats.top
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        lines.append(
            "  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        )
    if options.show_queries:
        lines += [f"  {s.queryid}: {_query_line(s.query).strip()}" for s in stats.top]
    else:
        lines.append("  (texts hidden; pass --show-queries to print them)")
    return lines
