"""Ready recovery probes: ``SELECT 1`` through the app's own engine or pool.

``BreakerSettings(probe=gr.ping(engine))`` lets the breaker test recovery itself, every
``probe_interval`` while it is open, instead of spending a user request on the trial.
The probe goes through the same pool as the app (so it succeeds when the app's
connections work again, not merely when the server answers) with the pool's own
timeouts. A connection the restart left dead in the pool fails the first query; the
probe then tries once more with a fresh one, as SQLAlchemy's ``pool_pre_ping`` would.
Synchronous engines and pools run in a worker thread, one probe at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread

__all__ = ["Ping", "ping"]

_SUPPORTED = (
    "sqlalchemy.Engine, sqlalchemy.ext.asyncio.AsyncEngine, asyncpg.Pool, "
    "psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool"
)


class _Reached:
    """Whether an attempt got a connection before it failed (then a retry may help)."""

    __slots__ = ("connected",)

    def __init__(self) -> None:
        self.connected = False


SyncAttempt = Callable[[_Reached], None]
AsyncAttempt = Callable[[_Reached], Awaitable[None]]


class Ping:
    """A recovery probe for ``BreakerSettings(probe=...)``: ``await probe()`` runs
    ``SELECT 1`` through the pool it was made for, and raises if the database cannot
    serve. Made by :func:`ping`."""

    __slots__ = ("_limiter", "_refresh", "_run_async", "_run_sync", "kind")

    def __init__(
        self,
        kind: str,
        *,
        sync: SyncAttempt | None = None,
        run: AsyncAttempt | None = None,
        refresh: Callable[[], Any] | None = None,
    ) -> None:
        self.kind = kind
        """What it pings, e.g. ``"sqlalchemy.Engine"`` (never a DSN)."""
        self._run_sync = sync
        self._run_async = run
        self._refresh = refresh
        self._limiter: anyio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        return f"ping({self.kind})"

    async def __call__(self) -> None:
        if self._run_sync is not None:
            if self._limiter is None:
                # One thread at a time: a probe stuck in a connect must not pile up
                # threads (the breaker cuts the wait; the thread ends on its own timeout).
                self._limiter = anyio.CapacityLimiter(1)
            await anyio.to_thread.run_sync(
                self._twice_sync, abandon_on_cancel=True, limiter=self._limiter
            )
            return
        assert self._run_async is not None
        reached = _Reached()
        try:
            await self._run_async(reached)
        except Exception:
            if not reached.connected:
                raise
            if self._refresh is not None:
                await self._refresh()
            await self._run_async(_Reached())

    def _twice_sync(self) -> None:
        assert self._run_sync is not None
        reached = _Reached()
        try:
            self._run_sync(reached)
        except Exception:
            if not reached.connected:
                raise
            if self._refresh is not None:
                self._refresh()
            self._run_sync(_Reached())


def ping(pool: Any) -> Ping:
    """A recovery probe running ``SELECT 1`` through ``pool``, for ``BreakerSettings(probe=...)``.

    ``pool`` is what the app queries through: a SQLAlchemy ``Engine`` or ``AsyncEngine``,
    an ``asyncpg.Pool``, or a psycopg_pool ``ConnectionPool`` or ``AsyncConnectionPool``::

        guard = gr.Guardrails(concurrency=15, breaker=gr.BreakerSettings(probe=gr.ping(engine)))

    The breaker runs it every ``probe_interval`` (1 s) while open and closes as soon as
    it succeeds, whatever ``reset_timeout`` says; no user request is a trial. It waits
    as long as the pool's own timeouts let it, cut off by ``probe_timeout``; give the
    engine or pool a connect timeout so that a probe cannot hang on an unreachable host.
    Synchronous engines and pools run in a worker thread. Raises ``TypeError`` for any
    other object.
    """
    modules = sys.modules
    if "sqlalchemy" in modules:
        from sqlalchemy.engine import Engine

        if isinstance(pool, Engine):
            return _sqlalchemy(pool)
        asyncio_ext = modules.get("sqlalchemy.ext.asyncio")
        if asyncio_ext is not None and isinstance(pool, asyncio_ext.AsyncEngine):
            return _sqlalchemy_async(pool)
    asyncpg = modules.get("asyncpg")
    if asyncpg is not None and isinstance(pool, asyncpg.Pool):
        return _asyncpg(pool)
    psycopg_pool = modules.get("psycopg_pool")
    if psycopg_pool is not None:
        if isinstance(pool, psycopg_pool.ConnectionPool):
            return _psycopg(pool)
        if isinstance(pool, psycopg_pool.AsyncConnectionPool):
            return _psycopg_async(pool)
    raise TypeError(
        f"gr.ping() needs the engine or pool the app queries through ({_SUPPORTED}), "
        f"not {type(pool).__qualname__}"
    )


def _sqlalchemy(engine: Any) -> Ping:
    from sqlalchemy import text

    query = text("SELECT 1")

    def attempt(reached: _Reached) -> None:
        with engine.connect() as conn:
            reached.connected = True
            conn.execute(query)

    return Ping("sqlalchemy.Engine", sync=attempt)


def _sqlalchemy_async(engine: Any) -> Ping:
    from sqlalchemy import text

    query = text("SELECT 1")

    async def attempt(reached: _Reached) -> None:
        async with engine.connect() as conn:
            reached.connected = True
            await conn.execute(query)

    return Ping("sqlalchemy.AsyncEngine", run=attempt)


def _asyncpg(pool: Any) -> Ping:
    async def attempt(reached: _Reached) -> None:
        async with pool.acquire() as conn:
            reached.connected = True
            await conn.fetchval("SELECT 1")

    return Ping("asyncpg.Pool", run=attempt)


# psycopg_pool keeps a dead idle connection until someone uses it: check() tests the
# idle ones and replaces the dead, so the retry (and the app after it) gets live ones.


def _psycopg(pool: Any) -> Ping:
    def attempt(reached: _Reached) -> None:
        with pool.connection() as conn:
            reached.connected = True
            conn.execute("SELECT 1")

    return Ping("psycopg_pool.ConnectionPool", sync=attempt, refresh=pool.check)


def _psycopg_async(pool: Any) -> Ping:
    async def attempt(reached: _Reached) -> None:
        async with pool.connection() as conn:
            reached.connected = True
            await conn.execute("SELECT 1")

    return Ping("psycopg_pool.AsyncConnectionPool", run=attempt, refresh=pool.check)
