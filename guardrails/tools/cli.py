"""The ``guardrails`` command: ``guardrails budget`` sizes a connection budget before a deploy.

``guardrails doctor`` wires its flags to :mod:`guardrails.tools.doctor`; ``guardrails demo`` is
delegated to :mod:`guardrails.tools.demo`, imported only when needed. Exit status: 0 fine, 1 the
pool does not fit the budget, a checklist item warns or the demo failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from guardrails.budget import ConnectionBudget
from guardrails.errors import BudgetExceeded
from guardrails.tools.doctor import (
    APPLICATION_NAME,
    DoctorError,
    DoctorOptions,
    diagnose,
    render_text,
)

__all__ = ["main"]

_DISTRIBUTION = "asgi-guardrails"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``guardrails`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status instead of exiting, also for ``--help``, ``--version`` and
    bad flags, so it can be called in-process.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help, --version and bad input; hand back its status.
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _version() -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrails",
        description="Keep Starlette and FastAPI apps alive when their database pool is "
        "under pressure.",
    )
    parser.add_argument("--version", action="version", version=f"guardrails {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    budget = commands.add_parser(
        "budget",
        help="size the connection budget and check a pool size against it",
        description="Show how many database connections each app process may hold, step "
        "by step, and check a pool size against it. Exit status: 0 it fits (or no "
        "--pool-size given), 1 --pool-size exceeds the budget, 2 bad input.",
    )
    _add_budget_arguments(budget)
    budget.set_defaults(handler=lambda args: _run_budget(args, budget))

    doctor = commands.add_parser(
        "doctor",
        help="read a live PostgreSQL's connection numbers and run the pre-release checklist",
        description="Connect to a live PostgreSQL (read-only, as application_name "
        f"{APPLICATION_NAME}), show its connection limits, the sessions open now, idle "
        "transactions, the longest running query and pg_stat_statements' slowest "
        "statements, suggest a connection budget and run the pre-release checklist. "
        "Exit status: 0 every item ok, 1 some item warns, 2 bad input or the database "
        "cannot be reached.",
    )
    _add_doctor_arguments(doctor)
    doctor.set_defaults(handler=_run_doctor)

    demo = commands.add_parser(
        "demo",
        help="run the same app under the same burst, without and then with guardrails",
        description="Run an example app under a burst of requests, first without and "
        "then with guardrails, and compare. Needs the demo extra: "
        "pip install 'asgi-guardrails[demo]'.",
    )
    try:
        import guardrails.tools.demo
    except ImportError as exc:
        # A broken or missing demo must not take `guardrails budget` down with it.
        # (Bound as a default: Python unbinds `exc` when the except block ends.)
        demo.set_defaults(handler=lambda args, error=exc: _demo_unavailable(error))
    else:
        guardrails.tools.demo.add_arguments(demo)
        demo.set_defaults(handler=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    import guardrails.tools.demo

    return guardrails.tools.demo.run(args)


def _demo_unavailable(exc: ImportError) -> int:
    print(f"guardrails demo: error: the demo cannot be imported: {exc}", file=sys.stderr)
    return 1


def _whole(minimum: int) -> Callable[[str], int]:
    # argparse puts "argument --flag: " in front of these messages.
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a whole number >= {minimum}, not {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, not {text}")
        return value

    return parse


def _utilization(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"must be a number above 0 and at most 1, not {text!r} "
            "(0.7 uses 70% of the usable connections and keeps 30% as headroom)"
        )
    return value


def _consumer(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    name = name.strip()
    try:
        value = int(count)
    except ValueError:
        value = -1
    if not sep or not name or value < 0:
        raise argparse.ArgumentTypeError(
            f"must be NAME=CONNECTIONS with a whole number >= 0, e.g. jobs=5, not {text!r}"
        )
    return name, value


def _add_budget_arguments(parser: argparse.ArgumentParser, *, limits: bool = True) -> None:
    # limits=False leaves out the database's own limits, for `doctor`, which reads them.
    database = parser.add_argument_group("the database")
    if limits:
        database.add_argument(
            "--max-connections",
            type=_whole(1),
            required=True,
            metavar="N",
            help="the database's connection limit (PostgreSQL: SHOW max_connections)",
        )
        database.add_argument(
            "--reserved",
            type=_whole(0),
            default=0,
            metavar="N",
            help="connections kept for superusers and admin tools (PostgreSQL: "
            "superuser_reserved_connections, 3 by default) (default: %(default)s)",
        )
    database.add_argument(
        "--other",
        type=_consumer,
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME=N",
        help="another consumer of the same database and the most connections it holds, "
        "e.g. --other jobs=5 admin=3 (repeatable)",
    )
    database.add_argument(
        "--target-utilization",
        type=_utilization,
        default=0.7,
        metavar="F",
        help="share of the remaining connections the app may use; the rest is headroom for "
        "deploy overlap, migrations and admin sessions (default: %(default)s)",
    )
    app = parser.add_argument_group("the app")
    count = app.add_mutually_exclusive_group()
    count.add_argument(
        "--processes",
        type=_whole(1),
        default=None,
        metavar="N",
        help="processes with their own pool: workers x replicas (default: 1)",
    )
    count.add_argument(
        "--instances",
        type=_whole(1),
        default=None,
        metavar="N",
        help="peak number of serverless instances, each with its own pool",
    )
    app.add_argument(
        "--pool-size",
        type=_whole(1),
        default=None,
        metavar="N",
        help="the pool size per process to check; exit status 1 when it does not fit",
    )
    app.add_argument(
        "--max-overflow",
        type=_whole(0),
        default=0,
        metavar="N",
        help="SQLAlchemy's max_overflow, counted on top of --pool-size (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def _error(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def _other_consumers(args: argparse.Namespace) -> dict[str, int]:
    other: dict[str, int] = {}
    for name, connections in args.other:
        if name in other:
            raise ValueError(f"--other {name} is given twice: give each consumer once")
        other[name] = connections
    return other


def _run_budget(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        other = _other_consumers(args)
    except ValueError as exc:
        return _error(parser, str(exc))
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
        return _error(parser, str(exc))

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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def _add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        metavar="URL",
        help="postgresql://user:password@host:5432/dbname; postgresql+asyncpg:// and "
        "postgresql+psycopg:// work too (default: $DATABASE_URL, which keeps the password "
        "out of the process list)",
    )
    _add_budget_arguments(parser, limits=False)
    checks = parser.add_argument_group("the checklist")
    checks.add_argument(
        "--concurrency",
        type=_whole(1),
        default=None,
        metavar="N",
        help="each process's limit on requests that use the database, to check against "
        "the pool and the per-process cap",
    )
    checks.add_argument(
        "--slow-query",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="a running query or a statement's mean time above this is slow (default: %(default)s)",
    )
    checks.add_argument(
        "--show-queries",
        action="store_true",
        help="print query texts too (they may hold data; hidden by default)",
    )
    checks.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="give up connecting after this long (default: %(default)s)",
    )


def _run_doctor(args: argparse.Namespace) -> int:
    prog = "guardrails doctor"
    if not args.database_url:
        print(f"{prog}: error: give --database-url URL or set DATABASE_URL", file=sys.stderr)
        return 2
    try:
        options = DoctorOptions(
            processes=args.processes or 1,
            instances=args.instances,
            other_consumers=_other_consumers(args),
            target_utilization=args.target_utilization,
            pool_size=args.pool_size,
            max_overflow=args.max_overflow,
            concurrency=args.concurrency,
            slow_query_seconds=args.slow_query,
            show_queries=args.show_queries,
            connect_timeout=args.connect_timeout,
        )
        report = diagnose(args.database_url, options)
    except (DoctorError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render_text(report))
    return 0 if report.ok else 1


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


if __name__ == "__main__":
    sys.exit(main())
