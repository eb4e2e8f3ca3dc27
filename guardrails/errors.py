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
#
# Only where an exception comes from decides (its type, its SQLSTATE, the frames that
# raised it), never its message: an app's ``int(request.query_params["page"])`` with
# ``?page=connection refused`` must not open the breaker for everyone.


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

# SQLSTATE codes (https://www.postgresql.org/docs/current/errcodes-appendix.html): besides
# class 08 (connection exception), too many connections and the server shutting down,
# crashed or starting up; serialization failure, deadlock and lock not available.
_OUTAGE_SQLSTATES = frozenset({"53300", "57P01", "57P02", "57P03"})
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
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
# Every error the server sends has a SQLSTATE; these drivers raise their OperationalError
# without one when the connection itself failed (refused, lost, closed, timed out).
_NO_SQLSTATE_OUTAGE_TYPES = frozenset({"psycopg.OperationalError", "psycopg2.OperationalError"})
# SQLITE_BUSY and SQLITE_LOCKED, the low byte of any of their extended codes.
_SQLITE_BUSY_CODES = frozenset({5, 6})

# Python 3.10's asyncio.TimeoutError is not yet the builtin TimeoutError.
_TIMEOUT_ERRORS = (TimeoutError, asyncio.TimeoutError)
# Packages of drivers and pools. A builtin OSError they raise (connection refused or reset,
# a broken pipe, a host that does not resolve) is the database connection failing; the
# same error from the app's own sockets (a cache, an HTTP API, a client hanging up) is not.
_DRIVER_PACKAGES = (
    "asyncpg",
    "psycopg",
    "psycopg_pool",
    "psycopg_binary",
    "psycopg_c",
    "psycopg2",
    "pg8000",
    "aiosqlite",
    "sqlalchemy.pool",
    "sqlalchemy.engine",
    "sqlalchemy.dialects",
    "sqlalchemy.connectors",
)
# What drivers call on their way to a socket: an error raised in there is still theirs.
# Any other code below a driver's frame (the app's connect or checkout hook, a user
# callback) makes the error that code's.
_PLUMBING_PACKAGES = (
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "contextlib",
    "concurrent",
    "threading",
    "uvloop",
    "sqlalchemy",
)
# A timeout counts only where a connection is being opened or waited for: asyncpg's
# connect and its pool's acquire functions (not Pool.fetch() and friends, whose frames
# also run in asyncpg.pool while a query times out), SQLAlchemy's pool. None: any function.
_CONNECTING: dict[str, frozenset[str] | None] = {
    "asyncpg.connect_utils": None,
    "asyncpg.pool": frozenset({"_acquire", "_acquire_impl", "acquire", "connect"}),
    "sqlalchemy.pool": None,
}
# asyncpg raises a plain InterfaceError when a closed connection is used; its raise site
# says it was closed (by the server, or when the connection was lost).
_CLOSED_CHECK = ("asyncpg.connection", "_check_open")
# A watched pool's acquire refused by a fault a test injected (guardrails.testing): the
# pool watcher's hook stands in for the pool there, and raises only from this function.
_INJECTED_REFUSAL = ("guardrails.pools.fault", "refuse")


def _within(module: str, packages: Iterable[str]) -> str | None:
    for package in packages:
        if module == package or module.startswith(package + "."):
            return package
    return None


def _raised_by_driver(exc: BaseException) -> bool:
    """Whether a driver or pool raised ``exc`` (a timeout: while getting a connection).

    Walks the traceback from the catching frame to the raise: the innermost frame that is
    neither a driver's nor plumbing decides. App code that called the driver comes before
    it and does not matter; app code the driver called (a hook) comes after and does.
    """
    timeout = isinstance(exc, _TIMEOUT_ERRORS)
    raised_by_driver = False
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        module = frame.f_globals.get("__name__") or ""
        if _within(module, _DRIVER_PACKAGES) is not None:
            if not timeout:
                raised_by_driver = True
            else:
                package = _within(module, _CONNECTING)
                functions = _CONNECTING.get(package or "", ())
                if functions is None or frame.f_code.co_name in functions:
                    raised_by_driver = True
        elif _within(module, _PLUMBING_PACKAGES) is None:
            raised_by_driver = False  # the app's own code, or code the driver called back
        tb = tb.tb_next
    return raised_by_driver


def _raise_site(exc: BaseException) -> tuple[str, str]:
    tb = exc.__traceback__
    if tb is None:
        return "", ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__") or "", tb.tb_frame.f_code.co_name


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
    if isinstance(exc, Shed):
        # Refused for load (the limiter, an outbound origin's bulkhead or breaker): says
        # nothing about the database.
        return ErrorKind.APP
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
        return None
    if names & _NO_SQLSTATE_OUTAGE_TYPES:
        return ErrorKind.OUTAGE
    if "sqlite3.OperationalError" in names:
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        if isinstance(code, int) and code & 0xFF in _SQLITE_BUSY_CODES:
            return ErrorKind.TRANSIENT  # the database is locked by another connection
        return None
    # The app's own sockets, wait_for/fail_after and query timeouts raise these as well;
    # only who raised them tells a database connection that failed apart.
    if isinstance(exc, OSError | asyncio.TimeoutError) and (
        _raised_by_driver(exc) or _raise_site(exc) == _INJECTED_REFUSAL
    ):
        return ErrorKind.OUTAGE
    if "asyncpg.exceptions._base.InterfaceError" in names and _raise_site(exc) == _CLOSED_CHECK:
        return ErrorKind.OUTAGE
    return None


def classify(exc: BaseException, classifiers: Iterable[Classifier] = ()) -> ErrorKind:
    """Say whether ``exc`` is a database outage, a transient error, or the app's own.

    ``classifiers`` run first, on every exception in the chain (the exception, its
    ``orig`` and ``__cause__``); the first answer that is not ``None`` wins. Then the
    built-in rules, which go by where an exception comes from and never by its message:

    - outages: the drivers' and pools' own errors for pool timeouts and failed, lost or
      refused connections; SQLSTATE class 08, 53300 and 57P01-57P03; psycopg's
      ``OperationalError`` without a SQLSTATE (the connection failed); a builtin
      ``OSError`` (connection refused or reset, ...) raised by a driver's or pool's own
      code. A ``TimeoutError`` counts only when raised getting a connection (asyncpg's
      connect or ``Pool.acquire``, or a watched pool's acquire refused by a fault from
      :mod:`guardrails.testing`): the app's ``wait_for``/``fail_after`` and query
      timeouts are the app's, as are the app's own sockets and a client that hung up;
    - transient: SQLSTATE 40001, 40P01 and 55P03; SQLite's busy or locked database;
    - everything else is the app's. Cancellation is never an outage.
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
