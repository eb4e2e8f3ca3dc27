"""The ``guardrails doctor`` command against real PostgreSQL servers and sessions the test opens.

A cluster of the module's own (max_connections=20, pg_stat_statements loaded, timeouts set)
is first made busy (one session idle in transaction, one in a long pg_sleep), then left
quiet for the checks that must all pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgcluster import PostgresServer, free_port

from guardrails.budget import ConnectionBudget
from guardrails.tools.cli import main
from guardrails.tools.doctor import (
    Activity,
    DoctorError,
    DoctorOptions,
    IdleInTransaction,
    Mark,
    Observations,
    ServerSettings,
    StatementStats,
    diagnose,
    report,
)

IDLE_APP = "doctor-test-idle"
SLEEPER_APP = "doctor-test-sleeper"
CONTROL_APP = "doctor-test-control"
PASSWORD = "hunter2-s3cr@t"
HEALTHY = ["--processes", "3", "--pool-size", "4", "--concurrency", "4"]


def _control(server: PostgresServer, dbname: str = "postgres") -> psycopg.Connection[Any]:
    url = server.dsn().rsplit("/", 1)[0] + f"/{dbname}"
    return psycopg.connect(url, autocommit=True, application_name=CONTROL_APP)


def _wait_for(conn: psycopg.Connection[Any], sql: str, what: str) -> None:
    deadline = time.monotonic() + 15
    while not conn.execute(sql.encode()).fetchone()[0]:  # type: ignore[index]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(pg_cluster_factory: Any) -> Iterator[PostgresServer]:
    """A cluster of the module's own, with pg_stat_statements and both timeouts set."""
    server: PostgresServer = pg_cluster_factory(
        max_connections=20,
        superuser_reserved_connections=2,
        shared_preload_libraries="pg_stat_statements",
        statement_timeout="30s",
        idle_in_transaction_session_timeout="60s",
    )
    with _control(server) as conn:
        conn.execute(b"CREATE EXTENSION pg_stat_statements")
    yield server
    server.close()


def _doctor(
    capsys: pytest.CaptureFixture[str], url: str, *flags: str, status: int
) -> dict[str, Any]:
    assert main(["doctor", "--database-url", url, *flags, "--json"]) == status
    out, err = capsys.readouterr()
    assert err == ""
    result: dict[str, Any] = json.loads(out)
    return result


def _text(capsys: pytest.CaptureFixture[str], url: str, *flags: str, status: int) -> str:
    assert main(["doctor", "--database-url", url, *flags]) == status
    out, err = capsys.readouterr()
    assert err == ""
    return out


def _checks(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["name"]: (c["status"], c["reason"]) for c in result["checks"]}


@pytest.fixture(scope="class")
def busy(server: PostgresServer) -> Iterator[str]:
    """The module's server with one session idle in transaction and one in pg_sleep(600)."""
    url = server.dsn()
    control = _control(server)
    idle = psycopg.connect(url, application_name=IDLE_APP)
    sleeper = psycopg.connect(url, autocommit=True, application_name=SLEEPER_APP)
    sleeper_pid = sleeper.info.backend_pid

    def sleep() -> None:
        # Cancelled by the teardown below.
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            sleeper.execute(b"SELECT pg_sleep(600)")

    thread = threading.Thread(target=sleep, daemon=True)
    try:
        # A completed slow statement, for pg_stat_statements' top list.
        control.execute(b"SELECT pg_sleep(0.05)")
        idle.execute(b"SELECT 1")  # opens a transaction and leaves it open
        thread.start()
        _wait_for(
            control,
            "SELECT count(*) = 2 FROM pg_stat_activity WHERE"
            f" (application_name = '{SLEEPER_APP}' AND state = 'active'"
            "   AND clock_timestamp() - query_start > interval '1.2 s')"
            f" OR (application_name = '{IDLE_APP}' AND state = 'idle in transaction'"
            "   AND clock_timestamp() - xact_start > interval '1.2 s')",
            "the sessions to be over a second old",
        )
        yield url
    finally:
        control.execute(f"SELECT pg_cancel_backend({sleeper_pid})".encode())
        thread.join(timeout=10)
        idle.close()
        sleeper.close()
        _wait_for(
            control,
            "SELECT count(*) = 0 FROM pg_stat_activity"
            f" WHERE application_name IN ('{IDLE_APP}', '{SLEEPER_APP}')",
            "the test's sessions to end",
        )
        control.close()


class TestBusyServer:
    """One session idle in transaction and one in a long pg_sleep, both over a second old."""

    def test_the_report_shows_the_sessions(
        self, busy: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        result = _doctor(capsys, busy, status=1)
        connections = result["connections"]
        # The doctor's own session is not counted; the test's three are, exactly.
        assert connections["by_application"] == {CONTROL_APP: 1, IDLE_APP: 1, SLEEPER_APP: 1}
        assert connections["by_state"] == {"active": 1, "idle": 1, "idle in transaction": 1}
        assert connections["by_user"] == {"postgres": 3}
        assert connections["total"] == 3
        assert result["idle_in_transaction"]["count"] == 1
        assert result["idle_in_transaction"]["oldest_seconds"] > 1.0
        longest = result["longest_query"]
        assert longest["application"] == SLEEPER_APP
        assert longest["seconds"] > 1.0
        assert longest["query"] is None
        statements = result["pg_stat_statements"]
        assert statements["installed"] is True
        assert statements["note"] is None
        assert max(s["mean_ms"] for s in statements["top"]) >= 50
        assert all(s["query"] is None for s in statements["top"])
        server = result["server"]
        assert (server["max_connections"], server["superuser_reserved_connections"]) == (20, 2)
        assert (
            server["statement_timeout_ms"],
            server["idle_in_transaction_session_timeout_ms"],
        ) == (
            30_000,
            60_000,
        )

    def test_query_texts_only_with_show_queries(
        self, busy: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        hidden = _text(capsys, busy, status=1)
        assert "pg_sleep" not in hidden
        assert "(text hidden; pass --show-queries to print it)" in hidden

        result = _doctor(capsys, busy, "--show-queries", status=1)
        assert result["longest_query"]["query"] == "SELECT pg_sleep(600)"
        assert any("pg_sleep" in (s["query"] or "") for s in result["pg_stat_statements"]["top"])
        shown = _text(capsys, busy, "--show-queries", status=1)
        assert "  SELECT pg_sleep(600)" in shown.splitlines()
        assert "text hidden" not in shown

    def test_the_text_report_is_in_aligned_sections(
        self, busy: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        lines = _text(capsys, busy, status=1).splitlines()
        assert "Connections open now: 3 of 20 (this one not counted)" in lines
        states = lines[lines.index("  by state:") + 1 : lines.index("  by application:")]
        assert [" ".join(line.split()) for line in states] == [
            "active 1",
            "idle 1",
            "idle in transaction 1",
        ]
        # The counts line up in one column.
        assert len({len(line) for line in states}) == 1
        assert any(
            line.startswith("Idle in transaction: 1 session, the oldest for ") for line in lines
        )
        assert any(
            line.startswith("Longest running query: ") and f"application {SLEEPER_APP}" in line
            for line in lines
        )
        checklist = lines[lines.index("Checklist:") + 1 :]
        marks = [line.split()[0] for line in checklist if line.startswith(("  ok ", "  warn "))]
        assert len(marks) == 7
        assert set(marks) == {"ok", "warn"}
        assert lines[-1] == f"{marks.count('warn')} of 7 items to look at."

    def test_the_checklist_warns_where_it_must(
        self, busy: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        result = _doctor(
            capsys, busy, "--processes", "3", "--pool-size", "5", "--concurrency", "8", status=1
        )
        checks = _checks(result)
        assert list(checks) == [
            "budget",
            "pool size",
            "concurrency",
            "timeouts",
            "idle in transaction",
            "slow queries",
            "visibility",
        ]
        # floor((20 - 2) x 0.7) = 12, // 3 = 4 per process.
        status, reason = checks["pool size"]
        assert status == "warn"
        assert "pool_size 5 (+ max_overflow 0) per process x 3 processes = 15" in reason
        assert "Set pool_size to at most 4" in reason
        assert checks["concurrency"] == (
            "warn",
            "concurrency 8 is above the pool size 5: 3 admitted requests would wait inside "
            "the pool, where a slow query turns into pool timeouts; set it to at most 4",
        )
        status, reason = checks["idle in transaction"]
        assert status == "warn"
        assert reason.startswith("1 session idle in transaction, the oldest for ")
        status, reason = checks["slow queries"]
        assert status == "warn"
        assert f"application {SLEEPER_APP}" in reason
        assert checks["budget"][0] == "ok"
        assert checks["budget"][1].startswith("3 connections open now, of 18 usable")
        assert checks["timeouts"][0] == "ok"
        assert checks["visibility"][0] == "ok"
        assert result["ok"] is False

    def test_the_suggested_budget_is_connection_budgets(
        self, busy: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        flags = ["--processes", "3", "--other", "jobs=2", "--target-utilization", "0.8"]
        expected = ConnectionBudget(
            max_connections=20,
            reserved=2,
            target_utilization=0.8,
            processes=3,
            other_consumers={"jobs": 2},
        )
        result = _doctor(capsys, busy, *flags, status=1)
        assert result["budget"] == expected.to_dict()
        assert (result["budget"]["app_total"], result["budget"]["per_process"]) == (12, 4)
        assert expected.explain() in _text(capsys, busy, *flags, status=1)

        serverless = _doctor(capsys, busy, "--instances", "5", status=1)
        assert serverless["budget"]["processes"] == 5
        assert serverless["budget"]["per_process"] == 2  # floor(18 x 0.7) = 12, // 5

    def test_too_many_processes_is_a_warning_not_a_crash(
        self, busy: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        result = _doctor(capsys, busy, "--processes", "13", status=1)
        assert result["budget"] is None
        status, reason = _checks(result)["budget"]
        assert status == "warn"
        assert reason == result["budget_error"]
        assert "shared by 13 processes is less than 1 per process" in reason


def test_a_quiet_server_passes_every_item(
    server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _doctor(capsys, server.dsn(), *HEALTHY, status=0)
    assert result["ok"] is True
    assert {c["status"] for c in result["checks"]} == {"ok"}
    assert result["connections"]["total"] == 0
    out = _text(capsys, server.dsn(), *HEALTHY, status=0)
    assert out.rstrip().endswith("All ok.")
    assert "statement_timeout 30 s" in [" ".join(line.split()) for line in out.splitlines()]


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_sqlalchemy_urls_are_accepted(
    server: PostgresServer, driver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _doctor(capsys, server.dsn(driver), *HEALTHY, status=0)
    assert result["database_url"] == server.dsn()


def test_asyncpg_sees_what_psycopg_sees(server: PostgresServer) -> None:
    options = DoctorOptions(processes=3, pool_size=4, concurrency=4)
    by_psycopg = diagnose(server.dsn(), options, driver="psycopg")
    by_asyncpg = diagnose(server.dsn(), options, driver="asyncpg")
    assert by_asyncpg.observations.server == by_psycopg.observations.server
    assert by_asyncpg.observations.activity == by_psycopg.observations.activity
    assert by_asyncpg.budget == by_psycopg.budget
    assert by_asyncpg.ok
    assert by_psycopg.ok


def test_without_psycopg_asyncpg_is_used(
    server: PostgresServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails
    result = _doctor(capsys, server.dsn(), *HEALTHY, status=0)
    assert result["server"]["max_connections"] == 20


def test_the_console_script_runs(server: PostgresServer) -> None:
    script = Path(sys.executable).with_name("guardrails")
    # The URL comes from DATABASE_URL, which keeps a password out of the process list.
    done = subprocess.run(
        [str(script), "doctor", *HEALTHY, "--json"],
        env={**os.environ, "DATABASE_URL": server.dsn()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checks"][0]["name"] == "budget"


@pytest.fixture
def unpreloaded(postgres: PostgresServer) -> Iterator[str]:
    """A database on the default server (no shared_preload_libraries) with the extension."""
    if not postgres.managed:
        pytest.skip("needs the suite's own server, to create and drop a database on it")
    with _control(postgres) as conn:
        conn.execute(b"DROP DATABASE IF EXISTS doctor_probe")
        conn.execute(b"CREATE DATABASE doctor_probe")
    with _control(postgres, "doctor_probe") as conn:
        conn.execute(b"CREATE EXTENSION pg_stat_statements")
    try:
        yield postgres.dsn().rsplit("/", 1)[0] + "/doctor_probe"
    finally:
        with _control(postgres) as conn:
            conn.execute(b"DROP DATABASE doctor_probe WITH (FORCE)")


def test_pg_stat_statements_absent_is_reported_not_fatal(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    if not postgres.managed:
        pytest.skip("a DATABASE_URL server may have pg_stat_statements installed")
    result = _doctor(capsys, postgres.dsn(), status=1)
    statements = result["pg_stat_statements"]
    assert statements["installed"] is False
    assert statements["top"] == []
    assert statements["note"] == (
        'pg_stat_statements is not installed in database "postgres": add pg_stat_statements '
        "to shared_preload_libraries, restart the server, then run CREATE EXTENSION "
        "pg_stat_statements; in that database to see which statements are slow"
    )
    status, reason = _checks(result)["visibility"]
    assert status == "warn"
    assert statements["note"] in reason
    # The suite's default server sets no timeouts.
    status, reason = _checks(result)["timeouts"]
    assert status == "warn"
    assert "ALTER ROLE postgres SET statement_timeout = '30s'" in reason


def test_pg_stat_statements_installed_but_not_loaded(
    unpreloaded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _doctor(capsys, unpreloaded, status=1)
    statements = result["pg_stat_statements"]
    assert statements["installed"] is True
    assert statements["note"].startswith("pg_stat_statements is installed but cannot be read (")
    assert "shared_preload_libraries" in statements["note"]


def test_an_ordinary_role_gets_the_report_too(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The app's own role may not read superuser-only settings: the doctor still works."""
    if not postgres.managed:
        pytest.skip("needs the suite's own server, to create and drop a role on it")
    with _control(postgres) as conn:
        conn.execute(b"DROP ROLE IF EXISTS doctor_app")
        conn.execute(b"CREATE ROLE doctor_app LOGIN")
    try:
        url = f"postgresql://doctor_app@{postgres.host}:{postgres.port}/postgres"
        for driver in ("psycopg", "asyncpg"):
            result = _doctor(capsys, url.replace("postgresql:", f"postgresql+{driver}:"), status=1)
            assert result["server"]["user"] == "doctor_app"
            assert result["server"]["shared_preload_libraries"] is None
            note = result["pg_stat_statements"]["note"]
            assert "this role may not read that setting" in note
    finally:
        with _control(postgres) as conn:
            conn.execute(b"DROP ROLE doctor_app")


# -- errors: exit 2, one line, never the password -------------------------------------------


def _refused_url(driver: str | None = None) -> str:
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://app:{PASSWORD.replace('@', '%40')}@127.0.0.1:{free_port()}/db"


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n")
    assert err.count("\n") == 1, err  # one line
    for secret in (PASSWORD, PASSWORD.replace("@", "%40"), "hunter2"):
        assert secret not in err
    return err


@pytest.mark.parametrize("block", [None, "psycopg"])
def test_a_refused_port_exits_2_without_the_password(
    block: str | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if block:  # so asyncpg's errors are checked as well
        monkeypatch.setitem(sys.modules, block, None)
    err = _fails(capsys, ["doctor", "--database-url", _refused_url("asyncpg")])
    assert err.startswith(
        "guardrails doctor: error: cannot connect to postgresql://app:***@127.0.0.1:"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"mysql://app:{PASSWORD}@127.0.0.1/db", "must be a PostgreSQL URL"),
        ("host=127.0.0.1 password=hunter2", "must be a PostgreSQL URL"),
        (f"postgresql://app:{PASSWORD}@127.0.0.1:port/db", "bad port: postgresql://app:***@"),
    ],
)
def test_a_bad_url_exits_2_without_the_password(
    url: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fails(capsys, ["doctor", "--database-url", url])
    assert expected in err


def test_no_url_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    err = _fails(capsys, ["doctor"])
    assert "give --database-url URL or set DATABASE_URL" in err


def test_no_driver_names_the_extra(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    err = _fails(capsys, ["doctor", "--database-url", _refused_url()])
    assert "neither psycopg nor asyncpg is installed: pip install 'asgi-guardrails[psycopg]'" in err
    with pytest.raises(DoctorError, match="pip install"):
        diagnose(_refused_url())


# -- judging plain data (no server needed) ----------------------------------------------------


def _observations(**server: Any) -> Observations:
    settings: dict[str, Any] = {
        "version": "16.4",
        "version_num": 160004,
        "database": "app",
        "user": "reader",
        "max_connections": 100,
        "superuser_reserved_connections": 3,
        "reserved_connections": 5,
        "statement_timeout_ms": 30_000,
        "idle_in_transaction_session_timeout_ms": 60_000,
        "track_activities": True,
        "shared_preload_libraries": "pg_stat_statements",
        **server,
    }
    return Observations(
        server=ServerSettings(**settings),
        activity=Activity(
            total=6,
            by_state=(("idle", 4), (None, 2)),
            by_application=(("web", 4), ("", 2)),
            by_user=(("web", 4), ("admin", 2)),
        ),
        idle_in_transaction=IdleInTransaction(count=0, oldest_seconds=None),
        longest_query=None,
        statements=StatementStats(installed=True),
    )


def test_reserved_connections_of_postgresql_16_are_reserved_too() -> None:
    result = report("postgresql://reader@db/app", _observations(), DoctorOptions(processes=4))
    assert result.budget == ConnectionBudget(
        max_connections=100, reserved=8, target_utilization=0.7, processes=4
    )
    assert result.budget is not None
    assert result.budget.per_process == 16  # floor(92 x 0.7) = 64, // 4


def test_hidden_and_unnamed_sessions_are_a_visibility_warning() -> None:
    result = report("postgresql://reader@db/app", _observations(), DoctorOptions())
    (visibility,) = (check for check in result.checks if check.name == "visibility")
    assert visibility.mark is Mark.WARN
    assert '2 sessions cannot be inspected by user "reader"' in visibility.reason
    assert "GRANT pg_read_all_stats" in visibility.reason
    assert "2 sessions set no application_name" in visibility.reason


def test_zero_timeouts_are_warned_about_with_the_fix() -> None:
    observations = _observations(statement_timeout_ms=0)
    result = report("postgresql://reader@db/app", observations, DoctorOptions())
    (timeouts,) = (check for check in result.checks if check.name == "timeouts")
    assert timeouts.mark is Mark.WARN
    assert "ALTER ROLE reader SET statement_timeout = '30s'" in timeouts.reason
    assert "idle_in_transaction_session_timeout" not in timeouts.reason
