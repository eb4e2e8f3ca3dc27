"""Flag types and the budget's flags, shared by ``guardrails budget`` and ``guardrails doctor``.

The types raise ``argparse.ArgumentTypeError`` with a message that says what to give
instead; argparse puts ``argument --flag:`` in front of it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = [
    "add_budget_arguments",
    "consumer",
    "other_consumers",
    "seconds",
    "usage_error",
    "utilization",
    "whole",
]


def whole(minimum: int) -> Callable[[str], int]:
    """The type of a flag that takes a whole number >= ``minimum``."""

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


def utilization(text: str) -> float:
    """The type of ``--target-utilization``: a share above 0 and at most 1."""
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


def consumer(text: str) -> tuple[str, int]:
    """The type of ``--other``: ``NAME=CONNECTIONS``, as ``(name, connections)``."""
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


def add_budget_arguments(parser: argparse.ArgumentParser, *, limits: bool = True) -> None:
    """Add the budget's flags (the database, the app, ``--json``) to ``parser``.

    ``limits=False`` leaves out the database's own limits, for ``doctor``, which reads them.
    """
    database = parser.add_argument_group("the database")
    if limits:
        database.add_argument(
            "--max-connections",
            type=whole(1),
            required=True,
            metavar="N",
            help="the database's connection limit (PostgreSQL: SHOW max_connections)",
        )
        database.add_argument(
            "--reserved",
            type=whole(0),
            default=0,
            metavar="N",
            help="connections kept for superusers and admin tools (PostgreSQL: "
            "superuser_reserved_connections, 3 by default) (default: %(default)s)",
        )
    database.add_argument(
        "--other",
        type=consumer,
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME=N",
        help="another consumer of the same database and the most connections it holds, "
        "e.g. --other jobs=5 admin=3 (repeatable)",
    )
    database.add_argument(
        "--target-utilization",
        type=utilization,
        default=0.7,
        metavar="F",
        help="share of the remaining connections the app may use; the rest is headroom for "
        "deploy overlap, migrations and admin sessions (default: %(default)s)",
    )
    app = parser.add_argument_group("the app")
    count = app.add_mutually_exclusive_group()
    count.add_argument(
        "--processes",
        type=whole(1),
        default=None,
        metavar="N",
        help="processes with their own pool: workers x replicas (default: 1)",
    )
    count.add_argument(
        "--instances",
        type=whole(1),
        default=None,
        metavar="N",
        help="peak number of serverless instances, each with its own pool",
    )
    app.add_argument(
        "--pool-size",
        type=whole(1),
        default=None,
        metavar="N",
        help="the pool size per process to check; exit status 1 when it does not fit",
    )
    app.add_argument(
        "--max-overflow",
        type=whole(0),
        default=0,
        metavar="N",
        help="SQLAlchemy's max_overflow, counted on top of --pool-size (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    """Print ``parser``'s usage and ``message`` as argparse does; the exit status 2."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def other_consumers(args: argparse.Namespace) -> dict[str, int]:
    """The ``--other`` flags as a dict; ValueError when a name is given twice."""
    other: dict[str, int] = {}
    for name, connections in args.other:
        if name in other:
            raise ValueError(f"--other {name} is given twice: give each consumer once")
        other[name] = connections
    return other


def seconds(text: str) -> float:
    """The type of a flag that takes a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value
