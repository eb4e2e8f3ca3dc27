"""Watching a psycopg_pool ``ConnectionPool`` or ``AsyncConnectionPool``.

psycopg_pool reports sizes and waiters through the public ``get_stats()`` but has no
per-checkout callback that can be added after construction. The watcher wraps the
public ``getconn()`` and ``putconn()`` on the pool *instance* (instance attributes
shadowing the methods; ``pool.connection()`` calls both through ``self``, so it is
covered); ``close()`` deletes them again. No private attribute is touched.

- ``getconn()`` is timed; ``PoolTimeout`` and ``TooManyRequests`` (``max_waiting``
  reached) out of it count as pool timeouts: both are the pool refusing an acquire
  under pressure.
- ``putconn()`` records the checkin before handing the connection back.
- ``size`` is ``max_size``; ``waiting`` is ``get_stats()["requests_waiting"]``;
  ``connects_total`` is its ``connections_num``.
"""

from __future__ import annotations

import functools
from typing import Any

from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout, TooManyRequests

from guardrails.pools._core import PoolSink, PoolWatcher, checked_name
from guardrails.pools.fault import inject, inject_async

__all__ = ["watch_psycopg"]

_MARK = "_guardrails_watcher"
_WRAPPED = ("getconn", "putconn")

Refused = (PoolTimeout, TooManyRequests)


class _PoolAdapter:
    kind = "psycopg"

    def __init__(self, pool: ConnectionPool[Any] | AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    def attach(self, watcher: PoolWatcher) -> None:
        pool = self.pool
        if isinstance(pool, AsyncConnectionPool):
            getconn, putconn = _async_wrappers(pool, watcher)
        else:
            getconn, putconn = _sync_wrappers(pool, watcher)
        vars(pool).update({"getconn": getconn, "putconn": putconn, _MARK: watcher})

    def detach(self) -> None:
        state = vars(self.pool)
        for attribute in (*_WRAPPED, _MARK):
            state.pop(attribute, None)

    def stats(self) -> dict[str, Any]:
        stats = self.pool.get_stats()
        return {
            "size": self.pool.max_size,
            "waiting": stats.get("requests_waiting"),
            "connects_total": stats.get("connections_num", 0),
        }


def _refused() -> BaseException:
    return PoolTimeout("couldn't get a connection (refused by a fault injected for testing)")


def _sync_wrappers(pool: ConnectionPool[Any], watcher: PoolWatcher) -> tuple[Any, Any]:
    original_get, original_put = pool.getconn, pool.putconn

    @functools.wraps(original_get)
    def getconn(timeout: float | None = None) -> Any:
        with watcher.acquiring(Refused):
            fault = watcher.fault
            if fault is not None:
                inject(watcher, fault, _refused)
            connection = original_get(timeout)
        watcher.checked_out(id(connection))
        return connection

    @functools.wraps(original_put)
    def putconn(connection: Any) -> None:
        watcher.checked_in(id(connection))
        original_put(connection)

    return getconn, putconn


def _async_wrappers(pool: AsyncConnectionPool[Any], watcher: PoolWatcher) -> tuple[Any, Any]:
    original_get, original_put = pool.getconn, pool.putconn

    @functools.wraps(original_get)
    async def getconn(timeout: float | None = None) -> Any:
        with watcher.acquiring(Refused):
            fault = watcher.fault
            if fault is not None:
                await inject_async(watcher, fault, _refused)
            connection = await original_get(timeout)
        watcher.checked_out(id(connection))
        return connection

    @functools.wraps(original_put)
    async def putconn(connection: Any) -> None:
        watcher.checked_in(id(connection))
        await original_put(connection)

    return getconn, putconn


def watch_psycopg(
    pool: ConnectionPool[Any] | AsyncConnectionPool[Any],
    *,
    sink: PoolSink | None,
    leak_threshold: float | None,
    name: str | None = None,
) -> PoolWatcher:
    """Watch a psycopg_pool pool; see :func:`guardrails.pools.watch`."""
    if _MARK in vars(pool):
        raise ValueError("this psycopg pool is already watched; close() its watcher first")
    label = checked_name(name, lambda: f"psycopg:{pool.name}")
    watcher = PoolWatcher("psycopg", label, sink=sink, leak_threshold=leak_threshold)
    adapter = _PoolAdapter(pool)
    adapter.attach(watcher)
    watcher.attach(adapter)
    return watcher
