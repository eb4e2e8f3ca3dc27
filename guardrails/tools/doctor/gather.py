"""Reading the numbers: connect read-only, then query settings, sessions and statements.

:func:`diagnose` is the whole run: connect, :func:`gather`, then judge with
:func:`guardrails.tools.doctor.checks.report`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

from guardrails.tools.doctor.checks import report
from guardrails.tools.doctor.model import (
    Activity,
    DoctorError,
    DoctorOptions,
    DoctorReport,
    IdleInTransaction,
    Observations,
    RunningQuery,
    ServerSettings,
    Statement,
    StatementStats,
)
from guardrails.tools.pgsession import (
    ConnectError,
    DatabaseUrl,
    Driver,
    QueryFailed,
    Session,
    connect,
)

__all__ = ["APPLICATION_NAME", "TOP_STATEMENTS", "diagnose", "gather"]

APPLICATION_NAME = "guardrails-doctor"
"""The ``application_name`` the doctor connects with, so it is easy to tell apart."""

TOP_STATEMENTS = 5
"""How many of pg_stat_statements' slowest statements the report shows."""

# Only client sessions take max_connections slots; background workers have their own.
_CLIENTS = "backend_type = 'client backend' AND pid <> pg_backend_pid()"


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
