"""``guardrails budget``: how many connections each process may hold, and whether a pool fits."""

from __future__ import annotations

import argparse
import json
from typing import Any

from guardrails.budget import ConnectionBudget
from guardrails.errors import BudgetExceeded
from guardrails.tools.cli.flags import add_budget_arguments, other_consumers, usage_error

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "size the connection budget and check a pool size against it"
DESCRIPTION = (
    "Show how many database connections each app process may hold, step "
    "by step, and check a pool size against it. Exit status: 0 it fits (or no "
    "--pool-size given), 1 --pool-size exceeds the budget, 2 bad input."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``guardrails budget``'s flags to ``parser``."""
    add_budget_arguments(parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Explain the budget the flags give and check ``--pool-size``; the exit status.

    ``parser`` prints the usage line in front of a bad-input message.
    """
    try:
        other = other_consumers(args)
    except ValueError as exc:
        return usage_error(parser, str(exc))
    processes = args.instances if args.instances is not None else (args.processes or 1)
    try:
        budget = ConnectionBudget(
            max_connections=args.max_connections,
            reserved=args.reserved,
            target_utilization=args.target_utilization,
            processes=processes,
            other_consumers=other,
        )
    except ValueError as exc:  # BudgetExceeded is a ValueError too
        return usage_error(parser, str(exc))

    failure: str | None = None
    if args.pool_size is not None:
        try:
            budget.check(args.pool_size, max_overflow=args.max_overflow)
        except BudgetExceeded as exc:
            failure = str(exc)
    warnings = _warnings(budget, args)

    if args.json:
        result: dict[str, Any] = budget.to_dict()
        result.update(
            instances=args.instances,
            pool_size=args.pool_size,
            max_overflow=args.max_overflow,
            ok=failure is None,
            error=failure,
            warnings=warnings,
        )
        print(json.dumps(result, indent=2))
        return 0 if failure is None else 1

    print(budget.explain())
    if args.instances is not None:
        print(
            f"\n(--instances {args.instances}: each serverless instance counts as a process "
            "with its own pool.)"
        )
    if args.pool_size is not None:
        pool = args.pool_size + args.max_overflow
        print()
        if failure is None:
            print(
                f"OK: pool size {pool} per process x {processes} = {pool * processes} "
                f"connections fits the budget of {budget.app_total} ({budget.per_process} "
                "per process)."
            )
        else:
            print(f"DOES NOT FIT: {failure}")
    if warnings:
        print()
        for warning in warnings:
            print(f"warning: {warning}")
    return 0 if failure is None else 1


def _warnings(budget: ConnectionBudget, args: argparse.Namespace) -> list[str]:
    warnings: list[str] = []
    pool = None if args.pool_size is None else args.pool_size + args.max_overflow
    if pool is not None and pool >= budget.max_connections:
        warnings.append(
            f"pool size {pool} is not below max_connections {budget.max_connections}: one "
            "process alone could take every connection, leaving none for a second process, "
            "a migration or an admin session"
        )
    if budget.target_utilization >= 0.9:
        left = round((1 - budget.target_utilization) * 100)
        room = "no headroom" if left == 0 else f"only {left}% headroom"
        warnings.append(
            f"target utilization {budget.target_utilization:g} leaves {room}: during a "
            "deploy old and new processes run side by side and both hold connections, and "
            "migrations and admin sessions need some too; 0.7 to 0.8 is usual"
        )
    if budget.reserved == 0:
        warnings.append(
            "reserved is 0: PostgreSQL keeps superuser_reserved_connections (3 by default) "
            "of max_connections for superusers; pass --reserved with that number if your "
            "database is PostgreSQL"
        )
    if args.instances is not None and pool is not None:
        total = args.instances * pool
        if total > budget.app_total:
            beyond = (
                f", more than max_connections {budget.max_connections} itself"
                if total > budget.max_connections
                else ""
            )
            fitting = budget.max_processes(args.pool_size, max_overflow=args.max_overflow)
            cap = f"cap the instances at {fitting}, " if fitting >= 1 else ""
            warnings.append(
                f"serverless: {args.instances} instances x pool size {pool} = {total} "
                f"connections at peak{beyond}, against a budget of {budget.app_total}: give "
                f"each instance a pool of at most {budget.per_process}, {cap}or put a "
                "connection pooler (PgBouncer, RDS Proxy) in front"
            )
    return warnings
