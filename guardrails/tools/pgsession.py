"""A short synchronous session on PostgreSQL for command-line tools, on psycopg or asyncpg.

Owns the database URL (SQLAlchemy's ``postgresql+DRIVER://`` forms too, the password
masked for display) and the choice of driver; every connection failure is one safe line.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

__all__ = [
    "INSTALL_HINT",
    "ConnectError",
    "DatabaseUrl",
    "Driver",
    "QueryFailed",
    "Session",
    "connect",
    "pick_driver",
]

Driver = Literal["psycopg", "asyncpg"]

INSTALL_HINT = "pip install 'asgi-guardrails[psycopg]'"
"""What to run when no driver is installed."""

URL_EXAMPLE = (
    "postgresql://user:password@host:5432/dbname (postgresql+asyncpg:// and "
    "postgresql+psycopg:// work too)"
)

Row = tuple[Any, ...]


class ConnectError(Exception):
    """A bad URL, no driver, or the server cannot be reached.

    The message is one line and never contains the password.
    """


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """A PostgreSQL URL in libpq form, whatever SQLAlchemy driver suffix it came with.

    ``parse`` accepts ``postgresql://``, ``postgres://`` and ``postgresql+DRIVER://``;
    ``shown`` is the URL with the password masked, safe to print and log.
    """

    libpq: str = field(repr=False)
    shown: str
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> DatabaseUrl:
        """Normalise ``url``, or raise :class:`ConnectError` saying what a good one looks like."""
        text = url.strip()
        scheme, sep, _ = text.partition("://")
        base = scheme.split("+", 1)[0].lower()
        if not sep or base not in ("postgresql", "postgres"):
            given = f"{scheme}://..." if sep else "a string that is not a URL"
            raise ConnectError(
                f"the database URL must be a PostgreSQL URL, {URL_EXAMPLE}; got {given}"
            )
        parts = urlsplit("postgresql://" + text.partition("://")[2])
        password = unquote(parts.password) if parts.password is not None else None
        shown_netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostinfo = parts.netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            shown_netloc = f"{user}:***@{hostinfo}"
        shown = urlunsplit(("postgresql", shown_netloc, parts.path, "", ""))
        try:
            parts.port  # noqa: B018  (urlsplit checks the port only when asked)
        except ValueError:
            raise ConnectError(
                f"the database URL has a bad port: {shown}; the port is a number, "
                f"e.g. {URL_EXAMPLE}"
            ) from None
        # SQLAlchemy's asyncpg dialect spells libpq's sslmode as ssl.
        query = parse_qsl(parts.query, keep_blank_values=True)
        names = {name for name, _ in query}
        if "ssl" in names and "sslmode" not in names:
            query = [("sslmode" if name == "ssl" else name, value) for name, value in query]
        libpq = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), ""))
        return cls(libpq=libpq, shown=shown, password=password)

    def scrub(self, text: str) -> str:
        """``text`` on one line, with any trace of the password masked."""
        line = " ".join(text.split())
        if self.password:
            for secret in {self.password, quote(self.password, safe=""), quote(self.password)}:
                line = line.replace(secret, "***")
        return line


class Session(Protocol):
    """One open connection, used from synchronous code whatever the driver."""

    def fetch(self, sql: str) -> list[Row]:
        """Run ``sql`` and return its rows as tuples; :class:`QueryFailed` on a server error."""

    def execute(self, sql: str) -> None:
        """Run ``sql`` that returns no rows; :class:`QueryFailed` on a server error."""

    def close(self) -> None:
        """Close the connection."""


class QueryFailed(Exception):
    """The server refused a statement; the message is the server's, possibly multi-line."""


class _PsycopgSession:
    def __init__(self, url: DatabaseUrl, timeout: float, application_name: str) -> None:
        import psycopg

        self._error = psycopg.Error
        self._conn = psycopg.connect(
            url.libpq,
            autocommit=True,
            # libpq takes whole seconds and treats anything below 2 as 2.
            connect_timeout=max(2, math.ceil(timeout)),
            application_name=application_name,
        )

    def fetch(self, sql: str) -> list[Row]:
        try:
            return [tuple(row) for row in self._conn.execute(sql.encode()).fetchall()]
        except self._error as exc:
            raise QueryFailed(str(exc)) from exc

    def execute(self, sql: str) -> None:
        try:
            self._conn.execute(sql.encode())
        except self._error as exc:
            raise QueryFailed(str(exc)) from exc

    def close(self) -> None:
        self._conn.close()


class _AsyncpgSession:
    def __init__(self, url: DatabaseUrl, timeout: float, application_name: str) -> None:
        import asyncpg

        self._error = asyncpg.PostgresError
        self._loop = asyncio.new_event_loop()
        try:
            self._conn = self._loop.run_until_complete(
                asyncpg.connect(
                    url.libpq,
                    timeout=timeout,
                    server_settings={"application_name": application_name},
                )
            )
        except BaseException:
            self._loop.close()
            raise

    def fetch(self, sql: str) -> list[Row]:
        try:
            rows = self._loop.run_until_complete(self._conn.fetch(sql))
        except self._error as exc:
            raise QueryFailed(str(exc)) from exc
        return [tuple(row) for row in rows]

    def execute(self, sql: str) -> None:
        try:
            self._loop.run_until_complete(self._conn.execute(sql))
        except self._error as exc:
            raise QueryFailed(str(exc)) from exc

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self._conn.close())
        finally:
            self._loop.close()


def pick_driver() -> Driver:
    """psycopg when it is installed, else asyncpg; :class:`ConnectError` when neither is."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pass
    else:
        return "psycopg"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        pass
    else:
        return "asyncpg"
    raise ConnectError(
        f"a PostgreSQL driver is needed, and neither psycopg nor asyncpg is installed: "
        f"{INSTALL_HINT}"
    )


def connect(
    url: DatabaseUrl, *, application_name: str, timeout: float, driver: Driver | None = None
) -> Session:
    """Open a :class:`Session` on ``url`` with ``driver`` (default: :func:`pick_driver`).

    Gives up after ``timeout`` seconds. Every failure is a :class:`ConnectError` of one
    line, with the password masked.
    """
    driver = driver or pick_driver()
    try:
        if driver == "psycopg":
            return _PsycopgSession(url, timeout, application_name)
        return _AsyncpgSession(url, timeout, application_name)
    except ImportError:
        raise ConnectError(f"the {driver} driver is not installed: {INSTALL_HINT}") from None
    except Exception as exc:
        # Driver errors, refused or timed-out sockets, bad URL parameters: all one line,
        # and the password masked even if a driver were to repeat it.
        detail = url.scrub(str(exc)) or type(exc).__name__
        # asyncio.TimeoutError is TimeoutError only from Python 3.11 on.
        if isinstance(exc, TimeoutError | asyncio.TimeoutError) and not str(exc):
            detail = f"no answer within {timeout:g} s"
        raise ConnectError(f"cannot connect to {url.shown}: {detail}") from None
