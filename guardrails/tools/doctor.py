"""``guardrails doctor``: what a live PostgreSQL says about connections, before settings change.

Gathers the numbers (limits, sessions by application, user and state, idle transactions,
long queries, pg_stat_statements) read-only over a :mod:`guardrails.tools.pgsession`, judges them
into a pre-release checklist and renders both as text or JSON, each step on its own.
"""

from __future__ import annotations

import contextlib
import math
import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from guardrails.budget import ConnectionBudget
from guardrails.errors import BudgetExceeded
from guardrails.tools.pgsession import (
    ConnectError,
    DatabaseUrl,
    Driver,
    QueryFailed,
    Session,
    connect,
)

__all__ = [
    "APPLICATION_NAME",
    "Activity",
    "Check",
    "DoctorError",
    "DoctorOptions",
    "DoctorReport",
    "IdleInTransaction",
    "Mark",
    "Observations",
    "RunningQuery",
    "ServerSettings",
    "Statement",
    "StatementStats",
    "diagnose",
    "gather",
    "judge",
    "render_text",
]

APPLICATION_NAME = "guardrails-doctor"
"""The ``application_name`` the doctor connects with, so it is easy to tell apart."""

IDLE_IN_TRANSACTION_WARN_SECONDS = 1.0
"""An idle transaction older than this is held open, not just between two statements."""

TOP_STATEMENTS = 5

# Only client sessions take max_connections slots; background workers have their own.
_CLIENTS = "backend_type = 'client backend' AND pid <> pg_backend_pid()"


class DoctorError(Exception):
    """The doctor could not run: a bad URL, no driver, or the database cannot be reached.

    The message is one line and never contains the password.
    """


class Mark(str, Enum):
    """How a checklist item came out."""

    OK = "ok"
    WARN = "warn"


# -- the settings ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    """What the doctor is told about the app, and how much to show.

    The budget fields mean what they mean for :class:`~guardrails.budget.ConnectionBudget`
    and ``guardrails budget``; ``instances`` (peak serverless instances) replaces
    ``processes`` when given. ``pool_size`` and ``concurrency`` are checked against the
    per-process cap when given. ``slow_query_seconds`` is where a query counts as slow.
    """

    processes: int = 1
    instances: int | None = None
    other_consumers: Mapping[str, int] = field(default_factory=dict)
    target_utilization: float = 0.7
    pool_size: int | None = None
    max_overflow: int = 0
    concurrency: int | None = None
    slow_query_seconds: float = 1.0
    show_queries: bool = False
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("processes", "instances", "pool_size", "concurrency"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")
        if not isinstance(self.max_overflow, int) or self.max_overflow < 0:
            raise ValueError(f"max_overflow must be a whole number >= 0, not {self.max_overflow!r}")
        for name in ("slow_query_seconds", "connect_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds above 0, not {value!r}")
        # Frozen: a private copy so a caller's dict cannot change the options later.
        object.__setattr__(self, "other_consumers", dict(self.other_consumers))

    @property
    def app_processes(self) -> int:
        """Everything that opens its own pool: ``instances`` when given, else ``processes``."""
        return self.instances if self.instances is not None else self.processes


# -- what was seen ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The server's limits and timeouts, as the connecting role sees them."""

    version: str
    version_num: int
    database: str
    user: str
    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int | None
    """PostgreSQL 16+ only (slots for roles with pg_use_reserved_connections); else None."""
    statement_timeout_ms: int
    idle_in_transaction_session_timeout_ms: int
    track_activities: bool
    shared_preload_libraries: str | None

    @property
    def reserved(self) -> int:
        """Slots ordinary roles can never get: superuser plus (16+) reserved connections."""
        return self.superuser_reserved_connections + (self.reserved_connections or 0)


@dataclass(frozen=True, slots=True)
class Activity:
    """Client sessions open now (the doctor's own not counted), grouped three ways.

    A session whose details the connecting role may not see has state ``None``.
    """

    total: int
    by_state: tuple[tuple[str | None, int], ...]
    by_application: tuple[tuple[str, int], ...]
    by_user: tuple[tuple[str, int], ...]

    @property
    def hidden(self) -> int:
        """Sessions whose state the connecting role may not see."""
        return dict(self.by_state).get(None, 0)

    @property
    def without_application_name(self) -> int:
        """Sessions that did not set ``application_name``."""
        return dict(self.by_application).get("", 0)


@dataclass(frozen=True, slots=True)
class IdleInTransaction:
    """Sessions inside a transaction but doing nothing: each holds a connection and locks."""

    count: int
    oldest_seconds: float | None
    """Seconds the longest-idle of them has been idle, or None when there is none."""


@dataclass(frozen=True, slots=True)
class RunningQuery:
    """The longest running active query; its text only when asked for."""

    pid: int
    user: str
    application: str
    seconds: float
    query: str | None


@dataclass(frozen=True, slots=True)
class Statement:
    """One row of pg_stat_statements; its text only when asked for."""

    queryid: int | None
    calls: int
    mean_ms: float
    total_ms: float
    query: str | None


@dataclass(frozen=True, slots=True)
class StatementStats:
    """pg_stat_statements' slowest statements by mean time, or why there are none."""

    installed: bool
    top: tuple[Statement, ...] = ()
    note: str | None = None
    """Set when the statistics could not be read: what is missing and how to enable it."""


@dataclass(frozen=True, slots=True)
class Observations:
    """Everything the doctor read from the server, as plain data."""

    server: ServerSettings
    activity: Activity
    idle_in_transaction: IdleInTransaction
    longest_query: RunningQuery | None
    statements: StatementStats


# -- the verdict -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """One pre-release checklist item: ok or warn, and why in words and numbers."""

    name: str
    mark: Mark
    reason: str


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """What was seen, the budget it suggests and the checklist: the doctor's whole answer."""

    url: str
    """The URL with its password masked."""
    options: DoctorOptions
    observations: Observations
    budget: ConnectionBudget | None
    budget_error: str | None
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """True when every checklist item is ok (the command then exits 0, else 1)."""
        return all(check.mark is Mark.OK for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready plain data."""
        obs = self.observations
        server = obs.server
        activity = obs.activity
        longest = obs.longest_query
        return {
            "ok": self.ok,
            "database_url": self.url,
            "server": {
                "version": server.version,
                "version_num": server.version_num,
                "database": server.database,
                "user": server.user,
                "max_connections": server.max_connections,
                "superuser_reserved_connections": server.superuser_reserved_connections,
                "reserved_connections": server.reserved_connections,
                "statement_timeout_ms": server.statement_timeout_ms,
                "idle_in_transaction_session_timeout_ms": (
                    server.idle_in_transaction_session_timeout_ms
                ),
                "track_activities": server.track_activities,
                "shared_preload_libraries": server.shared_preload_libraries,
            },
            "connections": {
                "total": activity.total,
                "by_state": {_state(state): n for state, n in activity.by_state},
                "by_application": dict(activity.by_application),
                "by_user": dict(activity.by_user),
                "hidden": activity.hidden,
                "without_application_name": activity.without_application_name,
            },
            "idle_in_transaction": {
                "count": obs.idle_in_transaction.count,
                "oldest_seconds": obs.idle_in_transaction.oldest_seconds,
            },
            "longest_query": None
            if longest is None
            else {
                "pid": longest.pid,
                "user": longest.user,
                "application": longest.application,
                "seconds": longest.seconds,
                "query": longest.query,
            },
            "pg_stat_statements": {
                "installed": obs.statements.installed,
                "note": obs.statements.note,
                "top": [
                    {
                        "queryid": s.queryid,
                        "calls": s.calls,
                        "mean_ms": s.mean_ms,
                        "total_ms": s.total_ms,
                        "query": s.query,
                    }
                    for s in obs.statements.top
                ],
            },
            "budget": None if self.budget is None else self.budget.to_dict(),
            "budget_error": self.budget_error,
            "inputs": {
                "processes": self.options.processes,
                "instances": self.options.instances,
                "pool_size": self.options.pool_size,
                "max_overflow": self.options.max_overflow,
                "concurrency": self.options.concurrency,
                "slow_query_seconds": self.options.slow_query_seconds,
                "show_queries": self.options.show_queries,
            },
            "checks": [
                {"name": c.name, "status": c.mark.value, "reason": c.reason} for c in self.checks
            ],
        }


# -- running it ------------------------------------------------------------------------------


def diagnose(
    database_url: str, options: DoctorOptions | None = None, *, driver: Driver | None = None
) -> DoctorReport:
    """Connect to ``database_url``, gather the numbers read-only and judge them.

    ``driver`` picks psycopg or asyncpg; by default psycopg when installed, else asyncpg.
    Raises :class:`DoctorError` (one line, password masked) when it cannot run. It blocks
    (asyncpg runs on a loop of its own): from async code, call it in a thread.
    """
    options = options or DoctorOptions()
    try:
        url = DatabaseUrl.parse(database_url)
        session = connect(
            url, application_name=APPLICATION_NAME, timeout=options.connect_timeout, driver=driver
        )
    except ConnectError as exc:
        raise DoctorError(str(exc)) from None
    try:
        observations = gather(session, options)
    except QueryFailed as exc:
        raise DoctorError(f"a query on {url.shown} failed: {url.scrub(str(exc))}") from None
    finally:
        # The numbers are in; a failed goodbye changes nothing.
        with contextlib.suppress(Exception):
            session.close()
    return report(url.shown, observations, options)


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


# -- gathering ---------------------------------------------------------------------------------


def gather(session: Session, options: DoctorOptions) -> Observations:
    """Read the numbers over an open session; every statement is read-only."""
    server = _server_settings(session)
    # Read after the settings above, so those show the role's values and not these.
    session.execute("SET default_transaction_read_only = on")
    session.execute("SET statement_timeout = '10s'")
    return Observations(
        server=server,
        activity=_activity(session),
        idle_in_transaction=_idle_in_transaction(session),
        longest_query=_longest_query(session, options.show_queries),
        statements=_statements(session, server, options.show_queries),
    )


def _server_settings(session: Session) -> ServerSettings:
    (row,) = session.fetch(
        "SELECT current_setting('server_version_num')::int, current_setting('server_version'),"
        " current_database(), current_user,"
        " current_setting('max_connections')::int,"
        " current_setting('superuser_reserved_connections')::int,"
        " (SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'),"
        " (SELECT setting::bigint FROM pg_settings"
        "   WHERE name = 'idle_in_transaction_session_timeout'),"
        " current_setting('track_activities')::bool,"
        # Superuser-only (or pg_read_all_settings): pg_settings hides the row from
        # other roles, where current_setting() would fail the whole query.
        " (SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries')"
    )
    version_num = int(row[0])
    reserved: int | None = None
    if version_num >= 160000:
        ((reserved,),) = session.fetch("SELECT current_setting('reserved_connections')::int")
    return ServerSettings(
        version=str(row[1]),
        version_num=version_num,
        database=str(row[2]),
        user=str(row[3]),
        max_connections=int(row[4]),
        superuser_reserved_connections=int(row[5]),
        reserved_connections=reserved,
        statement_timeout_ms=int(row[6]),
        idle_in_transaction_session_timeout_ms=int(row[7]),
        track_activities=bool(row[8]),
        shared_preload_libraries=None if row[9] is None else str(row[9]),
    )


def _ranked(counts: Counter[Any]) -> tuple[tuple[Any, int], ...]:
    # Largest first; ties by name so the output is stable (None, the hidden state, last).
    return tuple(
        sorted(counts.items(), key=lambda item: (-item[1], item[0] is None, item[0] or ""))
    )


def _activity(session: Session) -> Activity:
    rows = session.fetch(
        "SELECT coalesce(application_name, ''), coalesce(usename::text, ''), state, count(*)"
        f" FROM pg_stat_activity WHERE {_CLIENTS} GROUP BY 1, 2, 3"
    )
    states: Counter[str | None] = Counter()
    applications: Counter[str] = Counter()
    users: Counter[str] = Counter()
    for application, user, state, count in rows:
        states[state] += count
        applications[application] += count
        users[user] += count
    return Activity(
        total=sum(states.values()),
        by_state=_ranked(states),
        by_application=_ranked(applications),
        by_user=_ranked(users),
    )


def _idle_in_transaction(session: Session) -> IdleInTransaction:
    ((count, oldest),) = session.fetch(
        "SELECT count(*), max(extract(epoch FROM clock_timestamp() - state_change))::float8"
        f" FROM pg_stat_activity WHERE {_CLIENTS}"
        " AND state IN ('idle in transaction', 'idle in transaction (aborted)')"
    )
    return IdleInTransaction(count=int(count), oldest_seconds=None if oldest is None else oldest)


def _longest_query(session: Session, show_queries: bool) -> RunningQuery | None:
    text = "query" if show_queries else "NULL::text"
    rows = session.fetch(
        "SELECT pid, coalesce(usename::text, ''), coalesce(application_name, ''),"
        f" extract(epoch FROM clock_timestamp() - query_start)::float8, {text}"
        f" FROM pg_stat_activity WHERE {_CLIENTS} AND state = 'active'"
        " AND query_start IS NOT NULL ORDER BY query_start LIMIT 1"
    )
    if not rows:
        return None
    pid, user, application, seconds, query = rows[0]
    return RunningQuery(int(pid), user, application, max(0.0, seconds), query)


def _preloaded(server: ServerSettings) -> bool | None:
    """Whether pg_stat_statements is preloaded; None when this role may not see it."""
    if server.shared_preload_libraries is None:
        return None
    libraries = (name.strip().strip('"') for name in server.shared_preload_libraries.split(","))
    return "pg_stat_statements" in libraries


def _statements(session: Session, server: ServerSettings, show_queries: bool) -> StatementStats:
    preloaded = _preloaded(server)
    if preloaded:
        enable = "CREATE EXTENSION pg_stat_statements; in that database"
    elif preloaded is None:
        enable = (
            "make sure pg_stat_statements is in shared_preload_libraries (this role may not "
            "read that setting), then run CREATE EXTENSION pg_stat_statements; in that database"
        )
    else:
        enable = (
            "add pg_stat_statements to shared_preload_libraries, restart the server, then "
            "run CREATE EXTENSION pg_stat_statements; in that database"
        )
    rows = session.fetch(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'pg_stat_statements'"
    )
    if not rows:
        return StatementStats(
            installed=False,
            note=f'pg_stat_statements is not installed in database "{server.database}": '
            f"{enable} to see which statements are slow",
        )
    schema = '"' + str(rows[0][0]).replace('"', '""') + '"'
    # The columns were renamed in PostgreSQL 13 (pg_stat_statements 1.8).
    mean, total = (
        ("mean_exec_time", "total_exec_time")
        if server.version_num >= 130000
        else ("mean_time", "total_time")
    )
    text = "query" if show_queries else "NULL::text"
    try:
        rows = session.fetch(
            f"SELECT queryid, calls, {mean}::float8, {total}::float8, {text}"
            f" FROM {schema}.pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            f" AND calls > 0 ORDER BY {mean} DESC LIMIT {TOP_STATEMENTS}"
        )
    except QueryFailed as exc:
        # Typically "must be loaded via shared_preload_libraries": report it, never fail.
        return StatementStats(
            installed=True,
            note=f"pg_stat_statements is installed but cannot be read "
            f"({' '.join(str(exc).split())}): {enable}",
        )
    top = tuple(
        Statement(
            queryid=None if queryid is None else int(queryid),
            calls=int(calls),
            mean_ms=float(mean_ms),
            total_ms=float(total_ms),
            query=query,
        )
        for queryid, calls, mean_ms, total_ms, query in rows
    )
    return StatementStats(installed=True, top=top)


# -- judging -----------------------------------------------------------------------------------


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


def _duration_ms(ms: int) -> str:
    if ms == 0:
        return "0 (no limit)"
    if ms % 1000:
        return f"{ms} ms"
    seconds = ms // 1000
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


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
        f"statement_timeout {_duration_ms(server.statement_timeout_ms)} and "
        "idle_in_transaction_session_timeout "
        f"{_duration_ms(server.idle_in_transaction_session_timeout_ms)} bound how long one "
        f"connection can be held ({seen})",
    )


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _sessions(count: int) -> str:
    return f"{count} session{'' if count == 1 else 's'}"


def _check_idle(idle: IdleInTransaction) -> Check:
    oldest = idle.oldest_seconds or 0.0
    if idle.count == 0:
        return _ok("idle in transaction", "no session is idle in transaction")
    if oldest <= IDLE_IN_TRANSACTION_WARN_SECONDS:
        return _ok(
            "idle in transaction",
            f"{_sessions(idle.count)} idle in transaction, none for more than "
            f"{IDLE_IN_TRANSACTION_WARN_SECONDS:g} s (between two statements)",
        )
    return _warn(
        "idle in transaction",
        f"{_sessions(idle.count)} idle in transaction, the oldest for {_seconds(oldest)}: each "
        "holds a connection (and its locks) while doing nothing; commit or roll back "
        "before slow work, look for a leaked session (pg_stat_activity), and set "
        "idle_in_transaction_session_timeout",
    )


def _check_slow(observations: Observations, options: DoctorOptions) -> Check:
    limit = options.slow_query_seconds
    problems = []
    longest = observations.longest_query
    if longest is not None and longest.seconds > limit:
        problems.append(
            f"a query has been running for {_seconds(longest.seconds)} (pid {longest.pid}, "
            f"application {_name(longest.application)})"
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
        seen.append(f"the longest running query is at {_seconds(longest.seconds)}")
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
            f'{_sessions(activity.hidden)} cannot be inspected by user "{server.user}": run '
            "the doctor as a superuser or GRANT pg_read_all_stats TO it"
        )
    if activity.without_application_name:
        problems.append(
            f"{_sessions(activity.without_application_name)} set no application_name: set it "
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


# -- rendering ---------------------------------------------------------------------------------


def _name(value: str) -> str:
    return value or "(none)"


def _state(value: str | None) -> str:
    return "(hidden)" if value is None else value


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
        ("statement_timeout", _duration_ms(server.statement_timeout_ms)),
        (
            "idle_in_transaction_session_timeout",
            _duration_ms(server.idle_in_transaction_session_timeout_ms),
        ),
    ]
    lines += _table(settings)
    lines += [
        "",
        f"Connections open now: {activity.total} of {server.max_connections} "
        "(this one not counted)",
    ]
    lines += _counts("by state", ((_state(s), n) for s, n in activity.by_state))
    lines += _counts("by application", ((_name(a), n) for a, n in activity.by_application))
    lines += _counts("by user", ((_name(u), n) for u, n in activity.by_user))

    idle = obs.idle_in_transaction
    lines.append("")
    if idle.count:
        lines.append(
            f"Idle in transaction: {_sessions(idle.count)}, the oldest for "
            f"{_seconds(idle.oldest_seconds or 0.0)}"
        )
    else:
        lines.append("Idle in transaction: none")
    longest = obs.longest_query
    if longest is None:
        lines.append("Longest running query: none running")
    else:
        lines.append(
            f"Longest running query: {_seconds(longest.seconds)} (pid {longest.pid}, user "
            f"{_name(longest.user)}, application {_name(longest.application)})"
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
