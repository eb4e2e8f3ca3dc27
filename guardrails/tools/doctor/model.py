"""The doctor's data: its options, what it read from the server, and its report.

Plain frozen data, no I/O: :mod:`guardrails.tools.doctor.gather` fills it in,
:mod:`guardrails.tools.doctor.checks` judges it, :mod:`guardrails.tools.doctor.render`
shows it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from guardrails.budget import ConnectionBudget

__all__ = [
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
    "state_label",
]


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
                "by_state": {state_label(state): n for state, n in activity.by_state},
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


def state_label(value: str | None) -> str:
    """A session's state as shown and as a JSON key: ``(hidden)`` for one the role may not see."""
    return "(hidden)" if value is None else value
