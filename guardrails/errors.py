"""Exceptions raised by guardrails.

The hierarchy::

    GuardrailsError            base of everything guardrails raises
    ├── Unavailable            the database cannot serve now; carries retry_after
    │   └── Shed               this request was not admitted (limiter full, queue timeout)
    ├── ReadOnly               a write was refused because read-only mode is on
    └── BudgetExceeded         a pool or concurrency setting exceeds the connection budget
"""

from __future__ import annotations

import asyncio
from asyncio import CancelledError
from collections.abc import Callable, Iterable, Iterator
from enum import Enum

__all__ = [
    "BudgetExceeded",
    "Classifier",
    "ErrorKind",
    "GuardrailsError",
    "ReadOnly",
    "Shed",
    "Unavailable",
    "classify",
]


class GuardrailsError(Exception):
    """Base class of every exception guardrails raises."""


class Unavailable(GuardrailsError):
    """The database cannot serve this call now; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class Shed(Unavailable):
    """A request was refused admission by the concurrency limiter.

    ``reason`` is one of ``"queue_full"``, ``"queue_timeout"``, ``"deadline"`` or
    ``"evicted"`` (a low-priority waiter pushed out by more important work).
    """

    def __init__(self, reason: str, *, retry_after: int = 1) -> None:
        super().__init__(f"request shed: {reason}", retry_after=retry_after)
        self.reason = reason


class ReadOnly(GuardrailsError):
    """A write was refused because the guard is in read-only mode."""

    def __init__(self, reason: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(f"read-only mode: {reason}" if reason else "read-only mode")
        self.reason = reason
        self.retry_after = max(1, int(retry_after))


class BudgetExceeded(GuardrailsError, ValueError):
    """A pool size or concurrency setting does not fit the connection budget.

    The message shows the arithmetic and says what to change.
    """


# -- classification of errors raised by database drivers and pools -----------------------


class ErrorKind(str, Enum):
    """What an exception says about the database; the value is what logs and metrics show."""

    OUTAGE = "outage"
    """The pool or connection failed: counts toward the breaker, retryable for reads."""
    TRANSIENT = "transient"
    """The database answered but asks to try again (serialization failure, deadlock)."""
    APP = "app"
    """The application's own error (bad query, constraint): never counted, never retried."""


Classifier = Callable[[BaseException], "ErrorKind | None"]
"""Says what an exception is, or ``None`` to leave it to the next classifier."""

# SQLSTATE codes (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_OUTAGE_SQLSTATES = frozenset({"53300", "57P01", "57P02", "57P03"})
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})
_OUTAGE_MESSAGES = (
    "remaining connection slots are reserved",
    "too many clients already",
    "the database system is starting up",
    "the database system is shutting down",
    "connection refused",
    "connection reset",
    "server closed the connection unexpectedly",
    "connection is closed",
    "connection was closed",
    "terminating connection due to administrator command",
)
# Recognised by name so that no driver has to be installed for this module to work.
_OUTAGE_TYPES = frozenset(
    {
        "sqlalchemy.exc.TimeoutError",  # QueuePool limit reached, connection timed out
        "sqlalchemy.exc.DisconnectionError",
        "psycopg_pool.PoolTimeout",
        "psycopg_pool.TooManyRequests",
        "psycopg_pool.errors.PoolTimeout",
        "psycopg_pool.errors.TooManyRequests",
        "asyncpg.exceptions.PostgresConnectionError",
        "asyncpg.exceptions.ConnectionDoesNotExistError",
        "asyncpg.exceptions.ConnectionFailureError",
        "asyncpg.exceptions.ClientCannotConnectError",
        "asyncpg.exceptions.ConnectionRejectionError",
        "asyncpg.exceptions.TooManyConnectionsError",
        "asyncpg.exceptions.CannotConnectNowError",
        "asyncpg.exceptions.AdminShutdownError",
        "asyncpg.exceptions.CrashShutdownError",
        "asyncpg.exceptions._base.InternalClientError",
    }
)
_TRANSIENT_TYPES = frozenset(
    {
        "asyncpg.exceptions.SerializationError",
        "asyncpg.exceptions.DeadlockDetectedError",
        "psycopg.errors.SerializationFailure",
        "psycopg.errors.DeadlockDetected",
    }
)


# Python 3.10's asyncio.TimeoutError is not yet the builtin TimeoutError.
_TIMEOUT_ERRORS = (TimeoutError, asyncio.TimeoutError)
# Where a TimeoutError means "no connection could be had in time": asyncpg's connect,
# and the acquire functions of its pool (not Pool.fetch() and friends, whose frames
# also run in asyncpg.pool while a query times out).
_POOL_FRAMES: dict[str, frozenset[str] | None] = {
    "asyncpg.connect_utils": None,
    "asyncpg.pool": frozenset({"_acquire", "_acquire_impl", "acquire", "connect"}),
}


def _raised_acquiring(exc: BaseException) -> bool:
    """Whether a frame between the raise and the catch was acquiring a connection."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        functions = _POOL_FRAMES.get(frame.f_globals.get("__name__", ""), ())
        if functions is None or (functions and frame.f_code.co_name in functions):
            return True
        tb = tb.tb_next
    return False


def _type_names(exc: BaseException) -> Iterator[str]:
    for cls in type(exc).__mro__:
        yield f"{cls.__module__}.{cls.__qualname__}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    # Drivers wrap each other: SQLAlchemy's DBAPIError keeps the driver error in .orig,
    # adapters chain it as __cause__. Walk both, each exception once.
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException):
            todo.append(orig)
        # An exception group (a task group's failures): each of its exceptions.
        inner = getattr(current, "exceptions", None)
        if isinstance(inner, tuple):
            todo.extend(e for e in inner if isinstance(e, BaseException))
        if current.__cause__ is not None:
            todo.append(current.__cause__)


def in_chain(exc: BaseException, target: BaseException) -> bool:
    """Whether ``target`` is ``exc`` or one of the exceptions it wraps."""
    return any(link is target for link in _chain(exc))


def _builtin_kind(exc: BaseException) -> ErrorKind | None:
    if isinstance(exc, Unavailable):
        return ErrorKind.OUTAGE
    if isinstance(exc, GuardrailsError):
        return ErrorKind.APP
    names = set(_type_names(exc))
    if names & _OUTAGE_TYPES:
        return ErrorKind.OUTAGE
    if names & _TRANSIENT_TYPES:
        return ErrorKind.TRANSIENT
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate in _OUTAGE_SQLSTATES or sqlstate.startswith("08"):
            return ErrorKind.OUTAGE
        if sqlstate in _TRANSIENT_SQLSTATES:
            return ErrorKind.TRANSIENT
    if getattr(exc, "connection_invalidated", False):
        return ErrorKind.OUTAGE
    if isinstance(exc, ConnectionRefusedError | ConnectionResetError):
        return ErrorKind.OUTAGE
    # asyncpg's Pool.acquire(timeout=...) and its connect timeout raise a bare
    # TimeoutError; so do the app's own wait_for/fail_after and asyncpg's query
    # timeouts, which say nothing about the pool. Where it was raised tells them apart.
    if isinstance(exc, _TIMEOUT_ERRORS) and _raised_acquiring(exc):
        return ErrorKind.OUTAGE
    if "psycopg.OperationalError" in names and sqlstate is None:
        return ErrorKind.OUTAGE  # psycopg: no SQLSTATE means the connection itself failed
    message = str(exc).lower()
    if any(fragment in message for fragment in _OUTAGE_MESSAGES):
        return ErrorKind.OUTAGE
    return None


def classify(exc: BaseException, classifiers: Iterable[Classifier] = ()) -> ErrorKind:
    """Say whether ``exc`` is a database outage, a transient error, or the app's own.

    ``classifiers`` run first, on every exception in the chain (the exception, its
    ``orig`` and ``__cause__``); the first answer that is not ``None`` wins. Then the
    built-in rules: pool timeouts, connection failures, SQLSTATE 53300, 57P01-57P03
    and class 08 are outages; 40001 and 40P01 are transient. A bare ``TimeoutError`` is
    an outage only when a pool raised it (asyncpg's acquire or connect timeout): the
    app's own ``wait_for``/``fail_after`` and query timeouts are the app's. Cancellation
    is never an outage.
    """
    if isinstance(exc, CancelledError | KeyboardInterrupt | SystemExit | GeneratorExit):
        return ErrorKind.APP
    chain = list(_chain(exc))
    for classifier in classifiers:
        for link in chain:
            kind = classifier(link)
            if kind is not None:
                return ErrorKind(kind)
    transient = False
    for link in chain:
        kind = _builtin_kind(link)
        if kind is ErrorKind.OUTAGE:
            return kind
        transient = transient or kind is ErrorKind.TRANSIENT
    return ErrorKind.TRANSIENT if transient else ErrorKind.APP
