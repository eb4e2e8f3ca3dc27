"""The PostgreSQL harness itself: later tests trust these behaviours, so they are checked here."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
import sqlalchemy.exc
from conftest import ClusterFactory, EngineFactory
from pgcluster import PostgresServer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.anyio

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def small_pg(pg_cluster_factory: ClusterFactory) -> Iterator[PostgresServer]:
    """A cluster of this module's own with 8 connection slots, removed after the module."""
    server = pg_cluster_factory(max_connections=8)
    yield server
    server.close()


async def open_until_refused(
    url: str, limit: int
) -> tuple[list[asyncpg.Connection], asyncpg.TooManyConnectionsError | None]:
    """Connect until the server refuses (or ``limit`` is reached); the caller closes them."""
    connections: list[asyncpg.Connection] = []
    for _ in range(limit):
        try:
            connections.append(await asyncpg.connect(url))
        except asyncpg.TooManyConnectionsError as refused:
            return connections, refused
    return connections, None


async def test_engine_reaches_the_default_server(
    async_engine: AsyncEngine, postgres: PostgresServer, request: pytest.FixtureRequest
) -> None:
    async with async_engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT current_setting('server_version_num')::int / 10000,"
                    " current_setting('max_connections')::int, current_user"
                )
            )
        ).one()
    major, max_connections, user = row
    assert user == postgres.user
    if postgres.cluster is not None:  # a DATABASE_URL server is configured by someone else
        assert (major, max_connections) == (postgres.cluster.version[0], 100)
        assert major >= 15
    assert request.node.get_closest_marker("postgres") is not None  # auto-marked
    assert async_engine.url.render_as_string(hide_password=False) == postgres.dsn("asyncpg")


def test_urls() -> None:
    server = PostgresServer(host="127.0.0.1", port=5433)
    assert server.dsn() == "postgresql://postgres@127.0.0.1:5433/postgres"
    assert server.dsn("asyncpg") == "postgresql+asyncpg://postgres@127.0.0.1:5433/postgres"
    assert server.dsn("psycopg") == "postgresql+psycopg://postgres@127.0.0.1:5433/postgres"
    parsed = PostgresServer.from_url("postgresql://app:p%40ss@db.example:6543/shop")
    assert (parsed.user, parsed.password, parsed.host, parsed.port, parsed.dbname) == (
        "app",
        "p@ss",
        "db.example",
        6543,
        "shop",
    )
    assert parsed.dsn("asyncpg") == "postgresql+asyncpg://app:p%40ss@db.example:6543/shop"
    assert not parsed.managed


async def test_max_connections_counts_reserved_superuser_slots(small_pg: PostgresServer) -> None:
    # superuser_reserved_connections=3 (the default) keeps 3 of the 8 slots for superusers:
    # an application role gets 5, the postgres superuser the rest, then everyone is refused.
    admin = await asyncpg.connect(small_pg.dsn())
    try:
        settings = await admin.fetchrow(
            "SELECT current_setting('max_connections')::int AS max,"
            " current_setting('superuser_reserved_connections')::int AS reserved"
        )
        await admin.execute("DROP ROLE IF EXISTS app; CREATE ROLE app LOGIN")
    finally:
        await admin.close()
    assert settings is not None
    assert (settings["max"], settings["reserved"]) == (8, 3)

    app_url = f"postgresql://app@{small_pg.host}:{small_pg.port}/{small_pg.dbname}"
    app_conns, app_refused = await open_until_refused(app_url, limit=10)
    su_conns, su_refused = await open_until_refused(small_pg.dsn(), limit=10)
    try:
        assert len(app_conns) == 8 - 3
        assert len(app_conns) + len(su_conns) == 8
        for refused in (app_refused, su_refused):
            assert refused is not None
            assert refused.sqlstate == "53300"
    finally:
        for conn in app_conns + su_conns:
            await conn.close()


async def test_stop_refuses_connections_and_start_recovers_the_same_engine(
    postgres: PostgresServer, pg_url: str, async_engine_factory: EngineFactory
) -> None:
    engine = async_engine_factory(pool_size=1)
    # Twice, once as a crash, because outage tests stop and start the server repeatedly.
    for mode in ("fast", "immediate"):
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1

        postgres.stop(mode)
        assert not postgres.running
        with pytest.raises(OSError, match=r"refused|Connect call failed"):
            await asyncpg.connect(pg_url)
        # The pooled connection is dead: SQLAlchemy reports it and invalidates the pool.
        with pytest.raises(sqlalchemy.exc.DBAPIError) as excinfo:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        assert excinfo.value.connection_invalidated

        postgres.start()
        assert postgres.running
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 2"))).scalar() == 2


async def test_exhausted_pool_raises_sqlalchemy_timeout(
    async_engine_factory: EngineFactory,
) -> None:
    engine = async_engine_factory(pool_size=1, max_overflow=0, pool_timeout=0.2)
    holding = anyio.Event()

    async def hold_the_only_connection() -> None:
        async with engine.connect() as conn:
            holding.set()
            await conn.execute(text("SELECT pg_sleep(1)"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_the_only_connection)
        await holding.wait()
        started = anyio.current_time()
        with pytest.raises(sqlalchemy.exc.TimeoutError):
            async with engine.connect():
                pass
        waited = anyio.current_time() - started
    assert 0.2 <= waited < 0.8  # the pool's timeout, not the query's second


# The skip/fail/lazy-start rules run in a child pytest: they depend on the environment.

INNER_TESTS = """
import pgcluster
import pytest

def test_without_db():
    assert pgcluster.live_clusters() == []  # nothing was started for this test

def test_with_db(postgres):
    assert postgres.port
"""

HIDE_BINARIES = """
import pgcluster

pgcluster.find_bindir = lambda: None
"""


@pytest.fixture
def child(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A child pytest project with this suite's conftest, and a plugin hiding the binaries."""
    pytester.makeconftest((HERE / "conftest.py").read_text())
    shutil.copy(HERE / "pgcluster.py", pytester.path)
    pytester.makepyfile(test_inner=INNER_TESTS, hide_binaries=HIDE_BINARIES)
    pytester.makeini("[pytest]\nmarkers =\n    postgres: needs PostgreSQL\n")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("GUARDRAILS_REQUIRE_POSTGRES", raising=False)
    return pytester


def test_without_binaries_db_tests_skip_with_the_reason(child: pytest.Pytester) -> None:
    result = child.runpytest_subprocess("-p", "hide_binaries", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*PostgreSQL binaries (initdb, pg_ctl) not found*"])


def test_without_binaries_db_tests_fail_when_postgres_is_required(
    child: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARDRAILS_REQUIRE_POSTGRES", "1")
    result = child.runpytest_subprocess("-p", "hide_binaries")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*PostgreSQL binaries (initdb, pg_ctl) not found*"])


def test_not_postgres_deselects_db_tests_and_starts_nothing(child: pytest.Pytester) -> None:
    result = child.runpytest_subprocess("-m", "not postgres")
    result.assert_outcomes(passed=1, deselected=1)


def test_database_url_is_used_instead_of_a_cluster(
    child: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, postgres: PostgresServer
) -> None:
    child.makepyfile(
        test_url=f"""
        def test_it(postgres):
            assert (postgres.port, postgres.managed) == ({postgres.port}, False)
            postgres.stop()
        """
    )
    monkeypatch.setenv("DATABASE_URL", postgres.dsn())
    # Binaries hidden: had the child tried to start a cluster of its own, it would skip.
    result = child.runpytest_subprocess("-p", "hide_binaries", "-rs", "test_url.py")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*DATABASE_URL*cannot stop or start it*"])
