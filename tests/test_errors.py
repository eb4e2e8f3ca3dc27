"""Error classification on real exceptions from asyncpg, psycopg and SQLAlchemy on both.

Every outage here comes from a real driver talking to (or failing to reach) a real
PostgreSQL: a refused connection, a server out of connection slots, a backend terminated
by an administrator, pool timeouts. Against them: the app's own errors, whatever their
message says, and the app's own sockets (a closed port, an HTTP API or Redis that is
down, a client that hung up), which are never a database outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import psycopg
import psycopg_pool
import pytest
import redis.asyncio
import sqlalchemy.exc
from conftest import ClusterFactory
from pgcluster import PostgresServer, free_port
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.types import Message, Scope

import guardrails as gr
from guardrails.errors import ErrorKind, classify
from guardrails.observe.triage import refused_as_too_many

pytestmark = pytest.mark.anyio

NO_RETRY = Retry(NoBackoff(), 0)  # redis-py retries a refused connection by default

OUTAGE, TRANSIENT, APP = ErrorKind.OUTAGE, ErrorKind.TRANSIENT, ErrorKind.APP


async def raised(call: Callable[[], Awaitable[Any]]) -> BaseException:
    """The exception ``call`` raises; the test fails if it raises none."""
    try:
        await call()
    except Exception as exc:
        return exc
    raise AssertionError(f"{call} raised nothing")


@pytest.fixture
async def table(pg_url: str) -> AsyncIterator[str]:
    """A fresh table with a primary key, dropped after the test."""
    name = f"errors_{free_port()}"
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, n int NOT NULL)")
        await conn.execute(f"INSERT INTO {name} VALUES (1, 0), (2, 0)")
        yield name
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {name}")
        await conn.close()


def closed_port_url(driver: str = "") -> str:
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://postgres@127.0.0.1:{free_port()}/postgres"


def sqlalchemy_url(url: str, driver: str) -> str:
    return url.replace("postgresql://", f"postgresql+{driver}://")


async def on_every_driver(url: str, sql: str) -> list[BaseException]:
    """What ``sql`` raises on asyncpg, psycopg, and SQLAlchemy on each of them."""
    found: list[BaseException] = []
    conn = await asyncpg.connect(url)
    try:
        found.append(await raised(lambda: conn.execute(sql)))
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as pconn:
        found.append(await raised(lambda: pconn.execute(sql)))
    for driver in ("asyncpg", "psycopg"):
        engine = create_async_engine(sqlalchemy_url(url, driver))
        try:
            async with engine.connect() as sconn:
                found.append(await raised(lambda: sconn.execute(text(sql))))
        finally:
            await engine.dispose()
    return found


# Every message that once made an exception an outage, whatever raised it.
OUTAGE_SOUNDING = (
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
    "too many clients",
    "FATAL:  sorry, too many clients already",
)


# -- the app's own errors never count ---------------------------------------------------------


async def test_unique_violation_is_the_apps_error_on_every_driver(pg_url: str, table: str) -> None:
    insert = f"INSERT INTO {table} VALUES (1, 0)"
    found: list[BaseException] = []

    conn = await asyncpg.connect(pg_url)
    try:
        found.append(await raised(lambda: conn.execute(insert)))
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as pconn:
        found.append(await raised(lambda: pconn.execute(insert)))
    for driver in ("asyncpg", "psycopg"):
        engine = create_async_engine(pg_url.replace("postgresql://", f"postgresql+{driver}://"))
        try:
            async with engine.connect() as sconn:
                found.append(await raised(lambda: sconn.execute(text(insert))))
        finally:
            await engine.dispose()

    assert [type(exc).__name__ for exc in found] == [
        "UniqueViolationError",
        "UniqueViolation",
        "IntegrityError",
        "IntegrityError",
    ]
    assert [classify(exc) for exc in found] == [APP] * 4


async def test_a_bad_query_is_the_apps_error(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        exc = await raised(lambda: conn.execute("SELECT no_such_column FROM pg_class"))
    finally:
        await conn.close()
    assert classify(exc) is APP


async def test_a_query_that_echoes_outage_words_is_the_apps_error(pg_url: str) -> None:
    """The server quotes the bad input back in its message: still the app's error."""
    found = await on_every_driver(pg_url, "SELECT int4('connection refused; too many clients')")
    assert {getattr(exc, "sqlstate", None) for exc in found[:2]} == {"22P02"}
    assert all("connection refused" in str(exc) for exc in found)
    assert [classify(exc) for exc in found] == [APP] * 4
    assert not any(refused_as_too_many(exc) for exc in found)
    # asyncpg refuses the argument itself, before the query is sent.
    conn = await asyncpg.connect(pg_url)
    try:
        bad_argument = await raised(lambda: conn.fetchval("SELECT $1::int", "connection reset"))
    finally:
        await conn.close()
    assert "connection reset" in str(bad_argument)
    assert classify(bad_argument) is APP


async def test_a_syntax_error_is_the_apps_error_on_every_driver(pg_url: str) -> None:
    found = await on_every_driver(pg_url, "SELEC 1")
    assert {getattr(exc, "sqlstate", None) for exc in found[:2]} == {"42601"}
    assert [classify(exc) for exc in found] == [APP] * 4


def raise_and_catch(make: Callable[[], BaseException]) -> BaseException:
    """``make()`` raised here and caught, so it carries a traceback of the test's own."""
    try:
        raise make()
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("message", OUTAGE_SOUNDING)
async def test_no_message_makes_an_app_error_an_outage(message: str) -> None:
    def chained() -> BaseException:
        try:
            int(message)
        except ValueError as exc:
            raise RuntimeError(f"could not parse the page: {exc}") from exc
        raise AssertionError("int() accepted it")

    async def fail(make: Callable[[], BaseException]) -> None:
        raise make()

    async def group() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fail, lambda: ValueError(message))
            tg.start_soon(fail, lambda: OSError(message))

    found = [
        raise_and_catch(lambda: ValueError(message)),
        raise_and_catch(lambda: RuntimeError(message)),
        raise_and_catch(lambda: int(message)),  # type: ignore[arg-type, return-value]
        raise_and_catch(lambda: OSError(message)),
        raise_and_catch(chained),
        await raised(group),
    ]
    assert isinstance(found[2], ValueError)
    assert message in str(found[2])
    assert isinstance(found[4].__cause__, ValueError)
    assert type(found[5]).__name__ == "ExceptionGroup"
    assert [classify(exc) for exc in found] == [APP] * 6
    assert not any(refused_as_too_many(exc) for exc in found)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConnectionRefusedError(111, "Connection refused"),
        lambda: ConnectionResetError(104, "Connection reset by peer"),
        lambda: BrokenPipeError(32, "Broken pipe"),
        lambda: socket.gaierror(-2, "Name or service not known"),
        lambda: TimeoutError("timed out"),
    ],
    ids=["refused", "reset", "broken-pipe", "gaierror", "timeout"],
)
def test_builtin_connection_errors_of_the_apps_own_code_are_the_apps(
    make: Callable[[], BaseException],
) -> None:
    assert classify(raise_and_catch(make)) is APP
    assert classify(make()) is APP  # never raised: no traceback at all


def test_a_refused_socket_of_the_apps_own_is_not_an_outage() -> None:
    with pytest.raises(ConnectionRefusedError) as refused:
        socket.create_connection(("127.0.0.1", free_port()), timeout=2)
    assert classify(refused.value) is APP


async def test_the_apps_other_services_being_down_is_not_an_outage() -> None:
    """A cache or an HTTP API on a port nobody listens on: their failure, not the database's."""
    found = [await raised(lambda: asyncio.open_connection("127.0.0.1", free_port()))]
    async with httpx.AsyncClient() as client:
        found.append(await raised(lambda: client.get(f"http://127.0.0.1:{free_port()}/")))
    cache = redis.asyncio.Redis(port=free_port(), retry=NO_RETRY)
    try:
        found.append(await raised(cache.ping))
    finally:
        await cache.aclose()
    assert isinstance(found[0], ConnectionRefusedError)
    assert isinstance(found[1], httpx.ConnectError)
    assert type(found[2]).__name__ == "ConnectionError"  # redis-py's, wrapping the OSError
    assert [classify(exc) for exc in found] == [APP] * 3


async def test_a_client_that_hung_up_is_not_an_outage() -> None:
    """The server's ``send`` raises when the client is gone: Starlette's frames, no driver's."""

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    async def body() -> AsyncIterator[bytes]:
        yield b"row\n"

    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [],
        "asgi": {"spec_version": "2.4"},
    }
    found = [
        await raised(lambda: PlainTextResponse("connection refused")(scope, receive, send)),
        await raised(lambda: StreamingResponse(body())(scope, receive, send)),
    ]
    # A streaming response turns the OSError into ClientDisconnect (ASGI spec 2.4).
    assert [type(exc).__name__ for exc in found] == ["ConnectionResetError", "ClientDisconnect"]
    assert [classify(exc) for exc in found] == [APP] * 2


async def test_a_hook_of_the_apps_that_a_pool_calls_is_the_apps_error(pg_url: str) -> None:
    """An OSError raised below a pool's frames, but in the app's own hook: the app's."""

    def checkout_hook(*_: Any) -> None:
        socket.create_connection(("127.0.0.1", free_port()), timeout=2)  # e.g. a cache

    engine = create_async_engine(sqlalchemy_url(pg_url, "asyncpg"))
    event.listen(engine.sync_engine.pool, "checkout", checkout_hook)
    try:
        from_sqlalchemy = await raised(engine.connect)
    finally:
        await engine.dispose()

    async def setup(conn: asyncpg.Connection) -> None:
        await asyncio.open_connection("127.0.0.1", free_port())

    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1, setup=setup)
    try:
        from_asyncpg = await raised(lambda: pool.fetchval("SELECT 1"))
    finally:
        await pool.close()
    assert [type(exc) for exc in (from_sqlalchemy, from_asyncpg)] == [ConnectionRefusedError] * 2
    assert [classify(exc) for exc in (from_sqlalchemy, from_asyncpg)] == [APP, APP]


# -- outages ----------------------------------------------------------------------------------


async def test_a_refused_connection_is_an_outage_on_every_driver() -> None:
    found = [
        await raised(lambda: asyncpg.connect(closed_port_url(), timeout=2)),
        await raised(lambda: psycopg.AsyncConnection.connect(closed_port_url(), connect_timeout=2)),
    ]
    for driver in ("asyncpg", "psycopg"):
        engine = create_async_engine(closed_port_url(driver))
        try:
            found.append(await raised(engine.connect))
        finally:
            await engine.dispose()
    assert isinstance(found[0], OSError)
    assert isinstance(found[1], psycopg.OperationalError)
    # SQLAlchemy wraps psycopg's error; asyncpg's OSError from connect comes through as is.
    assert isinstance(found[3], sqlalchemy.exc.OperationalError)
    assert isinstance(found[2], OSError | sqlalchemy.exc.DBAPIError)
    assert [classify(exc) for exc in found] == [OUTAGE] * 4


async def refusals(url: str, driver_url: Callable[[str], str]) -> list[BaseException]:
    """What connecting to ``url`` raises on asyncpg, psycopg and SQLAlchemy on each."""
    found = [
        await raised(lambda: asyncpg.connect(url)),
        await raised(lambda: psycopg.AsyncConnection.connect(url)),
    ]
    for driver in ("asyncpg", "psycopg"):
        engine = create_async_engine(driver_url(driver))
        try:
            found.append(await raised(engine.connect))
        finally:
            await engine.dispose()
    return found


def check_too_many(found: list[BaseException]) -> None:
    assert type(found[0]).__name__ == "TooManyConnectionsError"
    assert getattr(found[0], "sqlstate", None) == "53300"
    # libpq reports a refused connection attempt without a SQLSTATE, only its text:
    # an outage all the same (psycopg's OperationalError without one).
    assert isinstance(found[1], psycopg.OperationalError)
    assert found[1].sqlstate is None
    assert isinstance(found[3], sqlalchemy.exc.OperationalError)
    assert [classify(exc) for exc in found] == [OUTAGE] * 4
    # The storm triage counts those with the SQLSTATE: asyncpg's, as is or wrapped.
    assert refused_as_too_many(found[0])
    assert refused_as_too_many(found[2])


async def test_a_server_out_of_connection_slots_is_an_outage(
    pg_cluster_factory: ClusterFactory,
) -> None:
    server: PostgresServer = pg_cluster_factory(max_connections=4, superuser_reserved_connections=0)
    held: list[asyncpg.Connection] = []
    try:
        for _ in range(4):
            held.append(await asyncpg.connect(server.dsn()))
        found = await refusals(server.dsn(), server.dsn)  # type: ignore[arg-type]
    finally:
        for conn in held:
            await conn.close()
    assert "too many clients" in str(found[1])
    check_too_many(found)


async def test_a_role_out_of_its_connection_limit_is_an_outage(pg_url: str) -> None:
    role = f"limited_{free_port()}"
    admin = await asyncpg.connect(pg_url)
    await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
    url = pg_url.replace("postgresql://postgres@", f"postgresql://{role}@")
    try:
        held = await asyncpg.connect(url)
        try:
            found = await refusals(url, lambda driver: sqlalchemy_url(url, driver))
        finally:
            await held.close()
    finally:
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()
    assert "too many connections for role" in str(found[0])
    check_too_many(found)


async def until(predicate: Callable[[], bool]) -> None:
    """Wait (at most 10 s) for ``predicate`` to hold."""
    with anyio.fail_after(10):
        while not predicate():
            await anyio.sleep(0.01)


async def test_a_backend_terminated_by_an_administrator_is_an_outage(pg_url: str) -> None:
    admin = await asyncpg.connect(pg_url)
    victim = await asyncpg.connect(pg_url)
    pvictim = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        for pid in (victim.get_server_pid(), pvictim.info.backend_pid):
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await until(victim.is_closed)  # asyncpg has read the server's goodbye
        found = [
            await raised(lambda: victim.fetchval("SELECT 1")),
            await raised(lambda: pvictim.execute("SELECT 1")),
            await raised(lambda: pvictim.execute("SELECT 1")),
        ]
    finally:
        await admin.close()
        victim.terminate()
        await pvictim.close()
    # asyncpg: "connection is closed"; psycopg: the server's 57P01, then a closed connection.
    assert type(found[0]).__name__ == "InterfaceError"
    assert getattr(found[1], "sqlstate", None) == "57P01"
    assert isinstance(found[2], psycopg.OperationalError)
    assert found[2].sqlstate is None
    assert [classify(exc) for exc in found] == [OUTAGE] * 3


async def test_a_backend_terminated_mid_query_is_an_outage_on_every_driver(pg_url: str) -> None:
    admin = await asyncpg.connect(pg_url)
    found: list[BaseException] = []

    async def terminated(run: Callable[[], Awaitable[Any]], pid: int) -> None:
        async with anyio.create_task_group() as tg:

            async def query() -> None:
                found.append(await raised(run))

            tg.start_soon(query)
            sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep%'"
            while not await admin.fetchval(sql, pid):
                await anyio.sleep(0.01)
            await admin.execute("SELECT pg_terminate_backend($1)", pid)

    try:
        victim = await asyncpg.connect(pg_url)
        await terminated(lambda: victim.fetchval("SELECT pg_sleep(30)"), victim.get_server_pid())
        victim.terminate()
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as pvictim:
            pid = pvictim.info.backend_pid
            await terminated(lambda: pvictim.execute("SELECT pg_sleep(30)"), pid)
        for driver in ("asyncpg", "psycopg"):
            engine = create_async_engine(sqlalchemy_url(pg_url, driver))
            try:
                async with engine.connect() as sconn:
                    pid = (await sconn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                    await terminated(lambda: sconn.execute(text("SELECT pg_sleep(30)")), pid)
            finally:
                await engine.dispose()
    finally:
        await admin.close()
    # asyncpg: ConnectionDoesNotExistError (08003) or AdminShutdownError (57P01), as is
    # or wrapped in SQLAlchemy's DBAPIError; psycopg: AdminShutdown (57P01).
    assert getattr(found[0], "sqlstate", None) in {"08003", "57P01"}
    assert isinstance(found[2], sqlalchemy.exc.DBAPIError)
    assert getattr(found[2].orig, "sqlstate", None) in {"08003", "57P01"}
    wrapped = getattr(found[3], "orig", None)
    assert [getattr(exc, "sqlstate", None) for exc in (found[1], wrapped)] == ["57P01"] * 2
    assert [classify(exc) for exc in found] == [OUTAGE] * 4


async def test_asyncpg_pool_acquire_timeout_is_an_outage_but_other_timeouts_are_not(
    pg_url: str,
) -> None:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            acquire_timeout = await raised(lambda: pool.acquire(timeout=0.1))
            query_timeout = await raised(lambda: conn.fetchval("SELECT pg_sleep(2)", timeout=0.1))
        # Through the pool's own fetchval: a query timeout still, not an acquire timeout.
        pool_query_timeout = await raised(lambda: pool.fetchval("SELECT pg_sleep(2)", timeout=0.1))
        async with pool.acquire() as conn:
            waited = await raised(
                lambda: asyncio.wait_for(conn.fetchval("SELECT pg_sleep(2)"), 0.1)
            )

            async def fail_after() -> None:
                with anyio.fail_after(0.1):
                    await conn.fetchval("SELECT pg_sleep(2)")

            app_deadline = await raised(fail_after)
    finally:
        await pool.close()
    for exc in (acquire_timeout, query_timeout, pool_query_timeout, waited, app_deadline):
        # One class from Python 3.11 on; on 3.10 anyio raises the builtin one.
        assert isinstance(exc, TimeoutError | asyncio.TimeoutError)
    assert classify(acquire_timeout) is OUTAGE
    # A slow query or the app's own deadline says nothing about the pool.
    others = (query_timeout, pool_query_timeout, waited, app_deadline)
    assert [classify(exc) for exc in others] == [APP] * 4


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_sqlalchemy_pool_timeout_is_an_outage(pg_url: str, driver: str) -> None:
    engine = create_async_engine(
        sqlalchemy_url(pg_url, driver), pool_size=1, max_overflow=0, pool_timeout=0.1
    )
    try:
        async with engine.connect():
            exc = await raised(engine.connect)
    finally:
        await engine.dispose()
    assert isinstance(exc, sqlalchemy.exc.TimeoutError)
    assert classify(exc) is OUTAGE
    assert classify(gr.Unavailable("pool", retry_after=1)) is OUTAGE


async def test_psycopg_pool_timeouts_and_too_many_waiters_are_outages(pg_url: str) -> None:
    pool = psycopg_pool.AsyncConnectionPool(
        pg_url, min_size=1, max_size=1, timeout=0.1, max_waiting=1, open=False
    )
    await pool.open(wait=True)

    async def wait_in_line() -> None:
        await pool.putconn(await pool.getconn(timeout=10))

    try:
        async with anyio.create_task_group() as tg:
            held = await pool.getconn()
            timed_out = await raised(pool.getconn)
            tg.start_soon(wait_in_line)
            await until(lambda: pool.get_stats()["requests_waiting"] == 1)
            too_many = await raised(pool.getconn)  # max_waiting=1: refused at once
            await pool.putconn(held)
    finally:
        await pool.close()
    assert isinstance(timed_out, psycopg_pool.PoolTimeout)
    assert isinstance(too_many, psycopg_pool.TooManyRequests)
    assert [classify(exc) for exc in (timed_out, too_many)] == [OUTAGE, OUTAGE]


async def test_an_outage_inside_a_task_groups_failures_is_an_outage() -> None:
    async def refused() -> None:
        await asyncpg.connect(closed_port_url(), timeout=2)

    async def app_error() -> None:
        with anyio.CancelScope(shield=True):  # fails too, after the refused connect
            await anyio.sleep(0.2)
        raise KeyError("app")

    async def group(*tasks: Callable[[], Awaitable[None]]) -> None:
        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(task)

    both = await raised(lambda: group(refused, app_error))
    only_app = await raised(lambda: group(app_error, app_error))
    assert type(both).__name__ == "ExceptionGroup"
    assert sorted(type(e).__name__ for e in both.exceptions) == [  # type: ignore[attr-defined]
        "ConnectionRefusedError",
        "KeyError",
    ]
    assert classify(both) is OUTAGE
    assert classify(only_app) is APP


# -- transient errors -------------------------------------------------------------------------


async def test_a_serialization_failure_is_transient(pg_url: str, table: str) -> None:
    """Write skew between two serializable transactions: one of them must fail with 40001."""

    async def skew(first: Any, second: Any, run: Callable[[Any, str], Awaitable[Any]]) -> None:
        for conn in (first, second):
            await run(conn, "BEGIN ISOLATION LEVEL SERIALIZABLE")
            await run(conn, f"SELECT sum(n) FROM {table}")
        await run(first, f"UPDATE {table} SET n = n + 1 WHERE id = 1")
        await run(second, f"UPDATE {table} SET n = n + 1 WHERE id = 2")
        await run(first, "COMMIT")
        await run(second, "COMMIT")

    a, b = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        asyncpg_error = await raised(lambda: skew(a, b, lambda c, sql: c.execute(sql)))
    finally:
        await a.close()
        await b.close()

    async def run_psycopg(conn: Any, sql: str) -> None:
        await conn.execute(sql)

    async with contextlib.AsyncExitStack() as stack:
        c, d = [
            await stack.enter_async_context(
                await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
            )
            for _ in range(2)
        ]
        psycopg_error = await raised(lambda: skew(c, d, run_psycopg))
    for exc in (asyncpg_error, psycopg_error):
        assert getattr(exc, "sqlstate", None) == "40001"
        assert classify(exc) is TRANSIENT


async def test_a_row_lock_not_available_is_transient_on_every_driver(
    pg_url: str, table: str
) -> None:
    holder = await asyncpg.connect(pg_url)
    try:
        async with holder.transaction():
            await holder.execute(f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE")
            found = await on_every_driver(
                pg_url, f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE NOWAIT"
            )
    finally:
        await holder.close()
    assert {getattr(exc, "sqlstate", None) for exc in found[:2]} == {"55P03"}
    assert [classify(exc) for exc in found] == [TRANSIENT] * 4


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="sqlite3 errors carry their code from Python 3.11 on"
)
async def test_a_locked_sqlite_database_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (n int)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0})
    try:
        with pytest.raises(sqlite3.OperationalError) as direct:
            sqlite3.connect(path, timeout=0).execute("SELECT * FROM t")
        async with engine.connect() as conn:
            wrapped = await raised(lambda: conn.execute(text("SELECT * FROM t")))
    finally:
        await engine.dispose()
        holder.close()
    assert getattr(direct.value, "sqlite_errorname", None) == "SQLITE_BUSY"
    assert isinstance(wrapped, sqlalchemy.exc.OperationalError)
    assert [classify(exc) for exc in (direct.value, wrapped)] == [TRANSIENT] * 2
    assert classify(raise_and_catch(lambda: sqlite3.OperationalError("no such table: t"))) is APP


# -- classifiers of one's own -----------------------------------------------------------------


async def test_own_classifiers_run_first_and_see_the_whole_chain(pg_url: str, table: str) -> None:
    engine = create_async_engine(pg_url.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with engine.connect() as conn:
            exc = await raised(lambda: conn.execute(text(f"INSERT INTO {table} VALUES (1, 0)")))
    finally:
        await engine.dispose()
    seen: list[str] = []

    def unique_is_outage(link: BaseException) -> ErrorKind | None:
        seen.append(type(link).__name__)
        return OUTAGE if type(link).__name__ == "UniqueViolationError" else None

    assert classify(exc) is APP
    assert classify(exc, [unique_is_outage]) is OUTAGE
    assert "UniqueViolationError" in seen
    assert classify(exc, [lambda link: None]) is APP
    settings = gr.BreakerSettings(classifiers=[unique_is_outage])
    assert classify(exc, settings.classifiers) is OUTAGE


def test_cancellation_is_never_an_outage() -> None:
    assert classify(asyncio.CancelledError()) is APP
    assert classify(asyncio.CancelledError(), [lambda link: OUTAGE]) is APP
