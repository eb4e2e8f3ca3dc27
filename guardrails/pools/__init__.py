"""Pool watchers: what a connection pool is doing, and which connections look leaked.

``watch(pool_or_engine, sink=...)`` picks the adapter by type: SQLAlchemy ``Engine`` /
``AsyncEngine`` (:mod:`guardrails.pools.sqlalchemy`), ``asyncpg.Pool``
(:mod:`guardrails.pools.asyncpg`), psycopg_pool ``ConnectionPool`` /
``AsyncConnectionPool`` (:mod:`guardrails.pools.psycopg`). Importing this package
imports no driver; an adapter is imported only for a pool of its kind.

Leak detection has no timers: connections over ``leak_threshold`` are noticed on the
pool's next checkout or checkin and on every :meth:`PoolWatcher.snapshot` (the guard
takes one each second), so a quiet pool costs nothing and sync pools in threads need no
event loop. Connections still out when their request's response is finished are
reported by :func:`request_finished`, which the middleware calls.

:func:`ping` makes a recovery probe for the breaker from the same engines and pools.
"""

from __future__ import annotations

import sys
from typing import Any

from guardrails.pools._core import (
    NO_REQUEST,
    LeakSuspect,
    PoolSink,
    PoolWatcher,
    checked_threshold,
    request_finished,
)
from guardrails.pools.probe import Ping, ping

__all__ = [
    "NO_REQUEST",
    "SUPPORTED",
    "LeakSuspect",
    "Ping",
    "PoolSink",
    "PoolWatcher",
    "checked_threshold",
    "ping",
    "request_finished",
    "watch",
]

SUPPORTED = (
    "sqlalchemy.Engine, sqlalchemy.ext.asyncio.AsyncEngine, asyncpg.Pool, "
    "psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool"
)
"""The pool types :func:`watch` accepts, as shown in its error message."""


def _kind_of(pool: object) -> str | None:
    # A pool of some driver can only exist if that driver is imported already, so
    # looking in sys.modules is enough and never imports a driver for nothing.
    modules = sys.modules
    if "sqlalchemy" in modules:
        from sqlalchemy.engine import Engine

        if isinstance(pool, Engine):
            return "sqlalchemy"
        asyncio_ext = modules.get("sqlalchemy.ext.asyncio")
        if asyncio_ext is not None and isinstance(pool, asyncio_ext.AsyncEngine):
            return "sqlalchemy"
    asyncpg = modules.get("asyncpg")
    if asyncpg is not None and isinstance(pool, asyncpg.Pool):
        return "asyncpg"
    psycopg_pool = modules.get("psycopg_pool")
    if psycopg_pool is not None and isinstance(
        pool, psycopg_pool.ConnectionPool | psycopg_pool.AsyncConnectionPool
    ):
        return "psycopg"
    return None


def watch(
    pool: Any,
    *,
    sink: PoolSink | None = None,
    leak_threshold: float | None = 30.0,
    name: str | None = None,
) -> PoolWatcher:
    """Start watching ``pool`` (an engine or a driver pool) and return its watcher.

    ``sink`` receives pool timeouts and leak suspects (see :class:`PoolSink`).
    ``leak_threshold`` is how many seconds a connection may stay checked out before
    it is reported once as a leak suspect (``None`` turns that check off; connections
    outliving their request are still reported). ``name`` labels the pool in snapshots
    and logs; the default comes from the pool's type, never from its DSN.

    Raises ``TypeError`` for any other kind of object, and ``ValueError`` when the
    pool is already watched (close that watcher first).
    """
    threshold = checked_threshold(leak_threshold)
    kind = _kind_of(pool)
    if kind == "sqlalchemy":
        from guardrails.pools.sqlalchemy import watch_engine

        return watch_engine(pool, sink=sink, leak_threshold=threshold, name=name)
    if kind == "asyncpg":
        from guardrails.pools.asyncpg import watch_asyncpg

        return watch_asyncpg(pool, sink=sink, leak_threshold=threshold, name=name)
    if kind == "psycopg":
        from guardrails.pools.psycopg import watch_psycopg

        return watch_psycopg(pool, sink=sink, leak_threshold=threshold, name=name)
    raise TypeError(f"cannot watch {type(pool).__qualname__}: supported pools are {SUPPORTED}")
