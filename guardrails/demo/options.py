"""The demo's knobs: the example's fixed numbers, the flag defaults, and their validation.

Imports nothing heavy, so ``guardrails demo --help`` works without the demo extra installed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "CAPACITY",
    "DEFAULT_DURATION",
    "DEFAULT_POOL_TIMEOUT",
    "DEFAULT_RATE",
    "MAX_QUEUE",
    "POOL_SIZE",
    "QUEUE_TIMEOUT",
    "SEED_ROWS",
    "SLOW_QUERY_MS",
    "STEADY_RATE",
    "DemoError",
    "DemoOptions",
    "add_arguments",
]

POOL_SIZE = 5
"""Connections in the example app's pool; also the guard's concurrency."""
SLOW_QUERY_MS = 150
"""How long one ``GET /dashboard`` holds its connection."""
CAPACITY = POOL_SIZE * 1000 / SLOW_QUERY_MS
"""Dashboard requests per second the pool can serve: 5 / 0.150 s, about 33."""
QUEUE_TIMEOUT = 1.0
"""Seconds a request may wait for a guard slot before it is shed."""
MAX_QUEUE = 32
"""Requests that may wait for a guard slot at once; the next one is shed at once."""
SEED_ROWS = 1000
"""Rows in the items table at start; ``GET /items/{id}`` asks for ids in 1..SEED_ROWS."""
STEADY_RATE = 6.0
"""Requests per second of light, mixed background traffic during the whole run."""

DEFAULT_DURATION = 12.0
DEFAULT_RATE = float(math.ceil(2 * CAPACITY))
# SQLAlchemy's own default is 30 s; 10 s still shows the hang but keeps both runs of the
# default demo under ~45 s on a 2-core machine.
DEFAULT_POOL_TIMEOUT = 10.0

_DATABASE_SCHEMES = ("postgresql+asyncpg",)


class DemoError(Exception):
    """The demo could not do its job: the server would not start, the database refused..."""


@dataclass(frozen=True)
class DemoOptions:
    """One demo run's settings, as validated from the command line."""

    duration: float = DEFAULT_DURATION
    rate: float = DEFAULT_RATE
    pool_timeout: float = DEFAULT_POOL_TIMEOUT
    database_url: str | None = None
    seed: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        return cls(
            duration=args.duration,
            rate=args.rate,
            pool_timeout=args.pool_timeout,
            database_url=args.database_url,
            seed=args.seed,
        )


def _number(low: float, high: float, unit: str) -> Callable[[str], float]:
    # argparse prefixes the flag's name to these messages.
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(
                f"must be between {low:g} and {high:g} {unit}, not {text}"
            )
        return value

    return parse


def _database_url(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in _DATABASE_SCHEMES or not rest:
        raise argparse.ArgumentTypeError(
            "must be a postgresql+asyncpg:// URL, e.g. "
            "postgresql+asyncpg://user:password@localhost:5432/dbname "
            "(leave it out to use a temporary SQLite file)"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's flags to ``parser``."""
    parser.add_argument(
        "--duration",
        type=_number(1, 600, "seconds"),
        default=DEFAULT_DURATION,
        metavar="SECONDS",
        help="seconds of load per run, one run without and one with guardrails "
        "(default: %(default)g)",
    )
    parser.add_argument(
        "--rate",
        type=_number(1, 1000, "requests per second"),
        default=DEFAULT_RATE,
        metavar="PER_SECOND",
        help=f"arrival rate of the burst on GET /dashboard; the pool serves about "
        f"{CAPACITY:.0f}/s (default: %(default)g, twice that)",
    )
    parser.add_argument(
        "--pool-timeout",
        type=_number(0.1, 120, "seconds"),
        default=DEFAULT_POOL_TIMEOUT,
        metavar="SECONDS",
        help="the example app's SQLAlchemy pool_timeout: how long a request waits for a "
        "connection before it fails (default: %(default)g; SQLAlchemy's own default is 30)",
    )
    parser.add_argument(
        "--database-url",
        type=_database_url,
        default=None,
        metavar="URL",
        help="run the example app on PostgreSQL (postgresql+asyncpg://...) instead of a "
        "temporary SQLite file; the slow query becomes pg_sleep(0.15) and a table named "
        "guardrails_demo_items is created there",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the random arrival times, so runs can be repeated (default: %(default)s)",
    )
