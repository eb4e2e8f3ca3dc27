"""Error classification on real exceptions from asyncpg, psycopg and SQLAlchemy on both.

Every exception here comes from a real driver talking to (or failing to reach) a real
PostgreSQL: a unique violation, a refused connection, a server out of connection slots,
a backend terminated by an administrator, a serialization failure, pool and query
timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import psycopg
import pytest
import sqlalchemy.exc
from conftest import ClusterFactory
from pgcluster import PostgresServer, free_port
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import guardrails as gr
from guardrails.errors import ErrorKind, classify

pytestmark = pytest.mark.anyio

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


async def test_a_server_out_of_connection_slots_is_an_outage(
    pg_cluster_factory: ClusterFactory,
) -> None:
    server: PostgresServer = pg_cluster_factory(max_connections=4, superuser_reserved_connections=0)
    held: list[asyncpg.Connection] = []
    found: list[BaseException] = []
    try:
        for _ in range(4):
            held.append(await asyncpg.connect(server.dsn()))
        found.append(await raised(lambda: asyncpg.connect(server.dsn())))
        found.append(await raised(lambda: psycopg.AsyncConnection.connect(server.dsn())))
        engine = create_async_engine(server.dsn("asyncpg"))
        try:
            found.append(await raised(engine.connect))
        finally:
            await engine.dispose()
    finally:
        for conn in held:
            await conn.close()
    assert type(found[0]).__name__ == "TooManyConnectionsError"
    assert getattr(found[0], "sqlstate", None) == "53300"
    # libpq reports a refused connection attempt without a SQLSTATE, only its text.
    assert isinstance(found[1], psycopg.OperationalError)
    assert "too many clients" in str(found[1])
    assert [classify(exc) for exc in found] == [OUTAGE] * 3


async def test_a_backend_terminated_by_an_administrator_is_an_outage(pg_url: str) -> None:
    admin = await asyncpg.connect(pg_url)
    victim = await asyncpg.connect(pg_url)
    pvictim = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        for pid in (victim.get_server_pid(), pvictim.info.backend_pid):
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        found = [
            await raised(lambda: victim.fetchval("SELECT 1")),
            await raised(lambda: pvictim.execute("SELECT 1")),
        ]
    finally:
        await admin.close()
        victim.terminate()
        await pvictim.close()
    assert [classify(exc) for exc in found] == [OUTAGE, OUTAGE]


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


async def test_sqlalchemy_pool_timeout_is_an_outage(pg_url: str) -> None:
    engine = create_async_engine(
        pg_url.replace("postgresql://", "postgresql+psycopg://"),
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.1,
    )
    try:
        async with engine.connect():
            exc = await raised(engine.connect)
    finally:
        await engine.dispose()
    assert isinstance(exc, sqlalchemy.exc.TimeoutError)
    assert classify(exc) is OUTAGE
    assert classify(gr.Unavailable("pool", retry_after=1)) is OUTAGE


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
