"""``guardrails doctor``'s flags, wired to :func:`guardrails.tools.doctor.diagnose`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from guardrails.tools.cli.flags import add_budget_arguments, other_consumers, seconds, whole
from guardrails.tools.doctor import (
    APPLICATION_NAME,
    DoctorError,
    DoctorOptions,
    diagnose,
    render_text,
)

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "read a live PostgreSQL's connection numbers and run the pre-release checklist"
DESCRIPTION = (
    "Connect to a live PostgreSQL (read-only, as application_name "
    f"{APPLICATION_NAME}), show its connection limits, the sessions open now, idle "
    "transactions, the longest running query and pg_stat_statements' slowest "
    "statements, suggest a connection budget and run the pre-release checklist. "
    "Exit status: 0 every item ok, 1 some item warns, 2 bad input or the database "
    "cannot be reached."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``guardrails doctor``'s flags to ``parser``."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        metavar="URL",
        help="postgresql://user:password@host:5432/dbname; postgresql+asyncpg:// and "
        "postgresql+psycopg:// work too (default: $DATABASE_URL, which keeps the password "
        "out of the process list)",
    )
    add_budget_arguments(parser, limits=False)
    checks = parser.add_argument_group("the checklist")
    checks.add_argument(
        "--concurrency",
        type=whole(1),
        default=None,
        metavar="N",
        help="each process's limit on requests that use the database, to check against "
        "the pool and the per-process cap",
    )
    checks.add_argument(
        "--slow-query",
        type=seconds,
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
        type=seconds,
        default=5.0,
        metavar="SECONDS",
        help="give up connecting after this long (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the doctor with the flags in ``args``, print its report; the exit status."""
    prog = "guardrails doctor"
    if not args.database_url:
        print(f"{prog}: error: give --database-url URL or set DATABASE_URL", file=sys.stderr)
        return 2
    try:
        options = DoctorOptions(
            processes=args.processes or 1,
            instances=args.instances,
            other_consumers=other_consumers(args),
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
