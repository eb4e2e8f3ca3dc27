"""Shared fixtures: a real PostgreSQL for the tests that need one, started only when asked for.

- ``postgres``: the session's default server (max_connections=100), or DATABASE_URL's.
- ``pg_cluster_factory(max_connections=8, **settings)``: an extra cluster of one's own.
- ``pg_url``: the default server's libpq URL, for asyncpg/psycopg used directly.
- ``async_engine_factory(...)`` / ``async_engine``: SQLAlchemy AsyncEngines on asyncpg,
  disposed after the test.

Without PostgreSQL binaries (and without DATABASE_URL) these fixtures skip the test, or fail
it when GUARDRAILS_REQUIRE_POSTGRES=1, so CI cannot pass by skipping everything.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol

import pytest
from pgcluster import (
    MISSING_BINARIES,
    PostgresServer,
    SettingValue,
    find_bindir,
    live_clusters,
    start_cluster,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# pytester: test_harness.py runs child sessions to check the skip/fail rules.
pytest_plugins = ["pytester"]

# Any test using one of these (directly or through another fixture) gets the ``postgres``
# marker, so ``-m "not postgres"`` runs the suite without a server.
POSTGRES_FIXTURES = frozenset(
    {"postgres", "pg_url", "pg_cluster_factory", "async_engine_factory", "async_engine"}
)


class ClusterFactory(Protocol):
    def __call__(self, *, max_connections: int = ..., **settings: SettingValue) -> PostgresServer:
        """Start a new throwaway cluster; it is removed at the end of the session."""


class EngineFactory(Protocol):
    def __call__(
        self,
        *,
        pool_size: int = ...,
        max_overflow: int = ...,
        pool_timeout: float = ...,
        server: PostgresServer | None = ...,
        **kwargs: Any,
    ) -> AsyncEngine:
        """Create an AsyncEngine on asyncpg; it is disposed when the test ends."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if POSTGRES_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


def _no_postgres(reason: str) -> NoReturn:
    if os.environ.get("GUARDRAILS_REQUIRE_POSTGRES") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """asyncio only: asyncpg and SQLAlchemy's async engine do not run on trio."""
    return "asyncio"


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    """Directory with initdb/pg_ctl/postgres; skips (or fails, if required) without one."""
    bindir = find_bindir()
    if bindir is None:
        _no_postgres(MISSING_BINARIES)
    return bindir


@pytest.fixture(scope="session")
def pg_cluster_factory(pg_bindir: Path) -> Iterator[ClusterFactory]:
    """Start extra clusters with their own settings, e.g. ``max_connections=8``.

    Each call initdb's a new cluster (about half a second). All are removed at the end of
    the session; a module fixture can ``yield`` one and call ``.close()`` to free it sooner.
    """
    started: list[PostgresServer] = []

    def factory(*, max_connections: int = 100, **settings: SettingValue) -> PostgresServer:
        server = start_cluster(pg_bindir, max_connections=max_connections, **settings)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.close()


@pytest.fixture(scope="session")
def postgres(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """The default server: the suite's own cluster (max_connections=100) or DATABASE_URL's."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield PostgresServer.from_url(url)
        return
    # Through the factory so a missing binary skips/fails the same way for both.
    factory: ClusterFactory = request.getfixturevalue("pg_cluster_factory")
    yield factory(max_connections=100)


@pytest.fixture(autouse=True)
def _restart_stopped_clusters() -> Iterator[None]:
    """A test that stopped a cluster and failed before restarting it must not break the next.

    Touches only clusters already started, so tests without a database start nothing.
    """
    yield
    for cluster in live_clusters():
        if not cluster.running:
            cluster.start()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The default server's libpq URL, e.g. ``postgresql://postgres@127.0.0.1:PORT/postgres``."""
    return postgres.dsn()


@pytest.fixture
async def async_engine_factory(
    postgres: PostgresServer, anyio_backend: str
) -> AsyncIterator[EngineFactory]:
    """Make AsyncEngines with small pools (2 connections, 0.5 s pool timeout) by default.

    ``server=`` targets another cluster (e.g. one from ``pg_cluster_factory``); other keyword
    arguments go to ``create_async_engine``. Every engine is disposed after the test.
    """
    engines: list[AsyncEngine] = []

    def factory(
        *,
        pool_size: int = 2,
        max_overflow: int = 0,
        pool_timeout: float = 0.5,
        server: PostgresServer | None = None,
        **kwargs: Any,
    ) -> AsyncEngine:
        engine = create_async_engine(
            (server or postgres).dsn("asyncpg"),
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            **kwargs,
        )
        engines.append(engine)
        return engine

    try:
        yield factory
    finally:
        for engine in engines:
            await engine.dispose()


@pytest.fixture
def async_engine(async_engine_factory: EngineFactory) -> AsyncEngine:
    """One engine on the default server with the factory's defaults."""
    return async_engine_factory()


# redis-server fixtures (tests/redisserver.py). The child projects of test_harness.py copy
# only this file and pgcluster.py: they go without.
try:  # noqa: SIM105
    from redisserver import redis_factory, redis_server, redis_url  # noqa: F401
except ModuleNotFoundError:
    pass
