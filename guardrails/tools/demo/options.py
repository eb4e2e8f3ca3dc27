"""The demo's knobs: the example's fixed numbers, the flag defaults, and their validation.

Imports nothing heavy, so ``guardrails demo --help`` works without the demo extra installed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "BURST_OFF",
    "BURST_ON",
    "CAPACITY",
    "DEFAULT_DURATION",
    "DEFAULT_OUTPUT",
    "DEFAULT_POOL_TIMEOUT",
    "DEFAULT_RATE",
    "JOB_INTERVAL",
    "JOB_QUERY_MS",
    "MAX_QUEUE",
    "POOL_SIZE",
    "QUEUE_TIMEOUT",
    "REPORT_QUERY_MS",
    "SEED_ROWS",
    "SEED_USERS",
    "SLOW_QUERY_MS",
    "STALE_TTL",
    "STEADY_RATE",
    "DemoError",
    "DemoOptions",
    "add_arguments",
    "password_for",
]

POOL_SIZE = 5
"""Connections in the example app's pool, in both runs; also the guard's slots."""
SLOW_QUERY_MS = 400
"""How long the dashboard's slow query holds its connection."""
REPORT_QUERY_MS = 1000
"""How long ``GET /reports/{name}`` holds its connection: the heavier, less urgent page."""
JOB_QUERY_MS = 300
"""How long each round of the background job holds a connection."""
JOB_INTERVAL = 2.0
"""Seconds between rounds of the background job that shares the app's pool."""
CAPACITY = POOL_SIZE * 1000 / SLOW_QUERY_MS
"""Dashboards per second the whole pool could serve if it did nothing else: 5 / 0.4 s."""
QUEUE_TIMEOUT = 0.5
"""Seconds a request may wait for a guard slot before it is shed."""
MAX_QUEUE = 4
"""Requests that may wait for a guard slot at once; the next one is shed at once.

Four normal slots finish about ten dashboards a second, so four waiters are served
within about ``QUEUE_TIMEOUT``: whoever is admitted still gets a timely answer.
"""
STALE_TTL = 120.0
"""Seconds the last good dashboard may be served, marked stale, instead of a 503."""
SEED_ROWS = 1000
"""Rows in the items table at start; ``GET /items/{id}`` asks for ids in 1..SEED_ROWS."""
SEED_USERS = 50
"""Accounts that ``POST /login`` can sign in."""
STEADY_RATE = 5.0
"""Requests per second of light, mixed traffic from a few users during the whole run."""
BURST_ON = 3.0
"""Seconds each burst on ``GET /dashboard`` lasts."""
BURST_OFF = 2.0
"""Seconds of calm between bursts."""

DEFAULT_DURATION = 15.0
DEFAULT_RATE = float(math.ceil(2 * CAPACITY))
# SQLAlchemy's own default is 30 s. 5 s still shows the hang and the 500s that end it,
# and keeps both runs of the default demo well under a minute.
DEFAULT_POOL_TIMEOUT = 5.0
DEFAULT_OUTPUT = "demo-output"

_DATABASE_SCHEMES = ("postgresql+asyncpg",)


def password_for(name: str) -> str:
    """The demo account ``name``'s password (the app seeds it, the load signs in with it)."""
    return f"{name}-password"


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
    output: str = DEFAULT_OUTPUT
    """Directory for the chart and the raw results."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        return cls(
            duration=args.duration,
            rate=args.rate,
            pool_timeout=args.pool_timeout,
            database_url=args.database_url,
            seed=args.seed,
            output=args.output,
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
        help=f"arrival rate of GET /dashboard during each burst; the whole pool serves "
        f"about {CAPACITY:g} of them a second (default: %(default)g, twice that)",
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
        "temporary SQLite file; the slow queries become pg_sleep() and tables named "
        "guardrails_demo_* are created there",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the random arrival times, so runs can be repeated (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help="directory for the chart (demo.png) and the raw results (demo.json, "
        "demo.csv); created if missing (default: %(default)s)",
    )
