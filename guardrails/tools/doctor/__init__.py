"""``guardrails doctor``: what a live PostgreSQL says about connections, before settings change.

Gathers the numbers (limits, sessions by application, user and state, idle transactions,
long queries, pg_stat_statements) read-only over a :mod:`guardrails.tools.pgsession`, judges them
into a pre-release checklist and renders both as text or JSON, each step on its own:
:mod:`~guardrails.tools.doctor.model` (the data), :mod:`~guardrails.tools.doctor.gather`
(connecting and reading), :mod:`~guardrails.tools.doctor.checks` (the budget and the
checklist) and :mod:`~guardrails.tools.doctor.render` (the text).
"""

from guardrails.tools.doctor.checks import (
    IDLE_IN_TRANSACTION_WARN_SECONDS,
    judge,
    report,
    suggest_budget,
)
from guardrails.tools.doctor.gather import APPLICATION_NAME, TOP_STATEMENTS, diagnose, gather
from guardrails.tools.doctor.model import (
    Activity,
    Check,
    DoctorError,
    DoctorOptions,
    DoctorReport,
    IdleInTransaction,
    Mark,
    Observations,
    RunningQuery,
    ServerSettings,
    Statement,
    StatementStats,
)
from guardrails.tools.doctor.render import render_text

__all__ = [
    "APPLICATION_NAME",
    "IDLE_IN_TRANSACTION_WARN_SECONDS",
    "TOP_STATEMENTS",
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
    "report",
    "suggest_budget",
]
