"""Judging the numbers: the budget they suggest and the pre-release checklist.

Each check is ok or warn, with the reason in words and numbers that say what to change.
"""

from __future__ import annotations

import re

from guardrails.budget import ConnectionBudget
from guardrails.errors import BudgetExceeded
from guardrails.tools.doctor.model import (
    Check,
    DoctorOptions,
    DoctorReport,
    IdleInTransaction,
    Mark,
    Observations,
    ServerSettings,
)
from guardrails.tools.doctor.render import duration_text, name_text, seconds_text, sessions_text

__all__ = ["IDLE_IN_TRANSACTION_WARN_SECONDS", "judge", "report", "suggest_budget"]

IDLE_IN_TRANSACTION_WARN_SECONDS = 1.0
"""An idle transaction older than this is held open, not just between two statements."""


def report(url: str, observations: Observations, options: DoctorOptions) -> DoctorReport:
    """Suggest a budget from ``observations`` and judge them into a :class:`DoctorReport`."""
    budget: ConnectionBudget | None = None
    budget_error: str | None = None
    try:
        budget = suggest_budget(observations.server, options)
    except ValueError as exc:  # BudgetExceeded too
        budget_error = str(exc)
    checks = judge(observations, options, budget, budget_error)
    return DoctorReport(url, options, observations, budget, budget_error, checks)


def suggest_budget(server: ServerSettings, options: DoctorOptions) -> ConnectionBudget:
    """The :class:`ConnectionBudget` the server's limits and the app's shape give."""
    return ConnectionBudget(
        max_connections=server.max_connections,
        reserved=server.reserved,
        target_utilization=options.target_utilization,
        processes=options.app_processes,
        other_consumers=options.other_consumers,
    )


def judge(
    observations: Observations,
    options: DoctorOptions,
    budget: ConnectionBudget | None,
    budget_error: str | None = None,
) -> tuple[Check, ...]:
    """The pre-release checklist: budget, pool size, concurrency, timeouts, idle
    transactions, slow queries and visibility, each ok or warn with the reason."""
    return (
        _check_budget(observations, options, budget, budget_error),
        _check_pool(options, budget),
        _check_concurrency(options, budget),
        _check_timeouts(observations.server),
        _check_idle(observations.idle_in_transaction),
        _check_slow(observations, options),
        _check_visibility(observations),
    )


def _ok(name: str, reason: str) -> Check:
    return Check(name, Mark.OK, reason)


def _warn(name: str, reason: str) -> Check:
    return Check(name, Mark.WARN, reason)


def _check_budget(
    observations: Observations,
    options: DoctorOptions,
    budget: ConnectionBudget | None,
    budget_error: str | None,
) -> Check:
    if budget is None:
        return _warn("budget", budget_error or "no budget could be made")
    now = observations.activity.total
    others = sum(budget.other_consumers.values())
    planned = budget.app_total + others
    plan = (
        f"the budget plans for {planned} ({budget.app_total} for the app"
        + (f" + {others} for other consumers" if others else "")
        + f", {budget.per_process} per process x {budget.processes})"
    )
    if now > planned:
        return _warn(
            "budget",
            f"{now} connections are open now, more than {plan}: count every process with "
            "--processes and every other client with --other NAME=N, or find who holds more "
            "than planned in the connections by application above",
        )
    if budget.target_utilization >= 0.9:
        return _warn(
            "budget",
            f"target utilization {budget.target_utilization:g} keeps "
            f"{budget.usable - others - budget.app_total} connections as headroom: a rolling "
            "deploy runs old and new processes side by side, and migrations and admin "
            "sessions need connections too; 0.7 to 0.8 is usual",
        )
    return _ok(
        "budget",
        f"{now} connections open now, of {budget.usable} usable "
        f"({budget.max_connections} max_connections - {budget.reserved} reserved); {plan}",
    )


def _pool_total(options: DoctorOptions) -> int | None:
    return None if options.pool_size is None else options.pool_size + options.max_overflow


def _check_pool(options: DoctorOptions, budget: ConnectionBudget | None) -> Check:
    pool = _pool_total(options)
    if budget is None:
        return _warn("pool size", "not checked: there is no budget to check it against")
    if options.pool_size is None or pool is None:
        return _warn(
            "pool size",
            f"not checked: pass --pool-size N (and --max-overflow N) to check the app's pool "
            f"against the per-process cap of {budget.per_process}",
        )
    try:
        budget.check(options.pool_size, max_overflow=options.max_overflow)
    except BudgetExceeded as exc:
        return _warn("pool size", str(exc))
    processes = budget.processes
    return _ok(
        "pool size",
        f"pool size {pool} per process x {processes} = {pool * processes} connections fits "
        f"the app total of {budget.app_total} ({budget.per_process} per process)",
    )


def _check_concurrency(options: DoctorOptions, budget: ConnectionBudget | None) -> Check:
    if budget is None:
        return _warn("concurrency", "not checked: there is no budget to check it against")
    cap = budget.per_process
    limit = options.concurrency
    if limit is None:
        return _warn(
            "concurrency",
            f"not checked: pass --concurrency N, each process's limit on requests that use "
            f"the database (Guardrails(budget=...) sets it to the per-process cap, {cap})",
        )
    pool = _pool_total(options)
    if pool is not None and limit > pool:
        return _warn(
            "concurrency",
            f"concurrency {limit} is above the pool size {pool}: {limit - pool} admitted "
            "requests would wait inside the pool, where a slow query turns into pool "
            f"timeouts; set it to at most {min(pool, cap)}",
        )
    if limit > cap:
        return _warn(
            "concurrency",
            f"concurrency {limit} is above the per-process cap of {cap}: x {budget.processes} "
            f"processes that is {limit * budget.processes} requests holding connections, "
            f"against an app total of {budget.app_total}; set it to at most {cap}",
        )
    within = f"the pool size {pool} and " if pool is not None else ""
    return _ok(
        "concurrency",
        f"concurrency {limit} is within {within}the per-process cap of {cap}: every admitted "
        "request finds a connection",
    )


def _check_timeouts(server: ServerSettings) -> Check:
    seen = f'as set for user "{server.user}" on database "{server.database}"'
    missing = []
    if server.statement_timeout_ms == 0:
        missing.append(
            ("statement_timeout", "a runaway query holds its connection for ever", "30s")
        )
    if server.idle_in_transaction_session_timeout_ms == 0:
        missing.append(
            (
                "idle_in_transaction_session_timeout",
                "a transaction left open holds its connection and locks for ever",
                "60s",
            )
        )
    if missing:
        what = "; ".join(f"{name} is 0 (no limit): {harm}" for name, harm, _ in missing)
        role = server.user
        if not re.fullmatch(r"[a-z_][a-z0-9_$]*", role):
            role = '"' + role.replace('"', '""') + '"'
        fix = " and ".join(f"ALTER ROLE {role} SET {name} = '{v}'" for name, _, v in missing)
        return _warn(
            "timeouts",
            f"{what} ({seen}; connect as the app's role to see its values). Set them for the "
            f"app's role, e.g. {fix}",
        )
    return _ok(
        "timeouts",
        f"statement_timeout {duration_text(server.statement_timeout_ms)} and "
        "idle_in_transaction_session_timeout "
        f"{duration_text(server.idle_in_transaction_session_timeout_ms)} bound how long one "
        f"connection can be held ({seen})",
    )


def _check_idle(idle: IdleInTransaction) -> Check:
    oldest = idle.oldest_seconds or 0.0
    if idle.count == 0:
        return _ok("idle in transaction", "no session is idle in transaction")
    if oldest <= IDLE_IN_TRANSACTION_WARN_SECONDS:
        return _ok(
            "idle in transaction",
            f"{sessions_text(idle.count)} idle in transaction, none for more than "
            f"{IDLE_IN_TRANSACTION_WARN_SECONDS:g} s (between two statements)",
        )
    return _warn(
        "idle in transaction",
        f"{sessions_text(idle.count)} idle in transaction, the oldest for "
        f"{seconds_text(oldest)}: each holds a connection (and its locks) while doing "
        "nothing; commit or roll back before slow work, look for a leaked session "
        "(pg_stat_activity), and set idle_in_transaction_session_timeout",
    )


def _check_slow(observations: Observations, options: DoctorOptions) -> Check:
    limit = options.slow_query_seconds
    problems = []
    longest = observations.longest_query
    if longest is not None and longest.seconds > limit:
        problems.append(
            f"a query has been running for {seconds_text(longest.seconds)} (pid {longest.pid}, "
            f"application {name_text(longest.application)})"
        )
    slow = [s for s in observations.statements.top if s.mean_ms > limit * 1000]
    if slow:
        worst = slow[0]
        problems.append(
            f"{len(slow)} statement{'' if len(slow) == 1 else 's'} in pg_stat_statements "
            f"average{'s' if len(slow) == 1 else ''} above it (the slowest "
            f"{worst.mean_ms:.0f} ms over {worst.calls} calls)"
        )
    if problems:
        return _warn(
            "slow queries",
            f"{'; '.join(problems)}, above {limit:g} s: a slow query holds its connection all "
            "that time, so the pool serves fewer requests per second; make it faster, or give "
            "its route a low-priority policy with a small max_concurrency",
        )
    seen = []
    if longest is not None:
        seen.append(f"the longest running query is at {seconds_text(longest.seconds)}")
    if observations.statements.top:
        seen.append(f"the slowest average is {observations.statements.top[0].mean_ms:.0f} ms")
    if not seen:
        seen.append("no query is running now")
    return _ok("slow queries", f"{' and '.join(seen)}, under {limit:g} s")


def _check_visibility(observations: Observations) -> Check:
    server = observations.server
    activity = observations.activity
    problems = []
    if not server.track_activities:
        problems.append("track_activities is off, so sessions show no state or query")
    if activity.hidden:
        problems.append(
            f'{sessions_text(activity.hidden)} cannot be inspected by user "{server.user}": run '
            "the doctor as a superuser or GRANT pg_read_all_stats TO it"
        )
    if activity.without_application_name:
        problems.append(
            f"{sessions_text(activity.without_application_name)} set no application_name: set it "
            "in each pool's connection settings, so pg_stat_activity tells who holds what"
        )
    if observations.statements.note:
        problems.append(observations.statements.note)
    if problems:
        return _warn("visibility", "; ".join(problems))
    return _ok(
        "visibility",
        "pg_stat_statements is readable, and every session is visible and named",
    )
