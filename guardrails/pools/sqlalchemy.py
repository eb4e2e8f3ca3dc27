"""Watching a SQLAlchemy ``Engine`` or ``AsyncEngine`` (through its ``sync_engine``).

How it hooks in:

- Checkouts, checkins, connects, closes, invalidations and detaches come from the
  public pool events (``event.listen(engine, "checkout", ...)``). Pool events
  registered on an engine survive ``engine.dispose()``: the new pool keeps them.
- SQLAlchemy has no event before a checkout starts waiting, so acquire waits, the
  waiting count and pool timeouts (``sqlalchemy.exc.TimeoutError``) come from
  wrapping the public ``Pool.connect()`` on the engine's pool *instance* (an instance
  attribute shadowing the method; every checkout, ``Engine.connect()``,
  ``raw_connection()``, option engines and ``AsyncEngine`` included, goes through it).
  ``engine.dispose()`` replaces the pool, so the public ``engine_disposed`` event
  wraps the new one. ``close()`` deletes the instance attribute again.
- ``size`` is ``pool_size + max_overflow`` for a ``QueuePool``; SQLAlchemy offers
  ``Pool.size()`` but no public getter for ``max_overflow``, so that one is read from
  the pool's private ``_max_overflow`` (read only, never written).

With ``AsyncEngine`` the pool runs inside a greenlet that SQLAlchemy starts with the
calling task's ``contextvars`` context, so the request's
:class:`~guardrails.context.CallContext` is visible in the checkout event; the stack
of the awaiting code is found by crossing to the parent greenlet's frame.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.util import await_only

from guardrails.pools._core import PoolSink, PoolWatcher, checked_name
from guardrails.pools.fault import inject

__all__ = ["watch_engine"]

_MARK = "_guardrails_watcher"


class _EngineAdapter:
    """Pool events plus a ``Pool.connect`` wrapper on one engine's current pool."""

    kind = "sqlalchemy"

    def __init__(self, engine: Engine, watcher: PoolWatcher) -> None:
        self.engine = engine
        self.watcher = watcher
        self.wrapped: Pool | None = None
        self.listeners: list[tuple[Any, str, Callable[..., None]]] = [
            (engine, "checkout", self._on_checkout),
            (engine, "checkin", self._on_checkin),
            (engine, "detach", self._on_detach),
            (engine, "connect", self._count("connects_total")),
            (engine, "close", self._count("closes_total")),
            (engine, "close_detached", self._count("closes_total")),
            (engine, "invalidate", self._count("invalidations_total")),
            (engine, "soft_invalidate", self._count("invalidations_total")),
            (engine, "engine_disposed", self._on_disposed),
        ]

    def attach(self) -> None:
        for target, name, listener in self.listeners:
            event.listen(target, name, listener)
        self._wrap(self.engine.pool)

    def detach(self) -> None:
        for target, name, listener in self.listeners:
            if event.contains(target, name, listener):
                event.remove(target, name, listener)
        self._unwrap()
        if getattr(self.engine, _MARK, None) is self.watcher:
            delattr(self.engine, _MARK)

    # Pool.connect wrapper ------------------------------------------------------------

    def _wrap(self, pool: Pool) -> None:
        original = pool.connect
        watcher = self.watcher
        # An async engine's pool runs in a greenlet on the event loop: wait there.
        sleep = _greenlet_sleep if self.engine.dialect.is_async else time.sleep

        @functools.wraps(original)
        def connect() -> Any:
            with watcher.acquiring(PoolTimeoutError):
                fault = watcher.fault
                if fault is not None:
                    inject(watcher, fault, _refused, sleep)
                return original()

        pool.connect = connect  # type: ignore[method-assign]
        self.wrapped = pool

    def _unwrap(self) -> None:
        pool, self.wrapped = self.wrapped, None
        if pool is not None and "connect" in vars(pool):
            del pool.connect

    # events --------------------------------------------------------------------------

    def _on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        self.watcher.checked_out(id(record))

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        self.watcher.checked_in(id(record))

    def _on_detach(self, dbapi_connection: Any, record: Any) -> None:
        # Detached from the pool: the app owns it now, outside the pool's accounting.
        self.watcher.checked_in(id(record))

    def _on_disposed(self, engine: Engine) -> None:
        self._unwrap()
        self._wrap(self.engine.pool)

    def _count(self, name: str) -> Callable[..., None]:
        def count(*args: Any) -> None:
            self.watcher.count(name)

        return count

    def stats(self) -> dict[str, Any]:
        pool = self.engine.pool
        size: int | None = None
        if isinstance(pool, QueuePool):
            overflow = getattr(pool, "_max_overflow", 0)
            size = pool.size() + overflow if overflow >= 0 else None
        return {"size": size, "waiting": self.watcher.waiting}


def _refused() -> BaseException:
    return PoolTimeoutError("QueuePool timed out (refused by a fault injected for testing)")


def _greenlet_sleep(seconds: float) -> None:
    await_only(asyncio.sleep(seconds))


def watch_engine(
    engine: Engine | AsyncEngine,
    *,
    sink: PoolSink | None,
    leak_threshold: float | None,
    name: str | None = None,
) -> PoolWatcher:
    """Watch a SQLAlchemy ``Engine`` or ``AsyncEngine``; see :func:`guardrails.pools.watch`."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if getattr(sync_engine, _MARK, None) is not None:
        raise ValueError("this engine is already watched; close() its watcher first")
    label = checked_name(name, lambda: f"sqlalchemy:{sync_engine.url.drivername}")
    watcher = PoolWatcher("sqlalchemy", label, sink=sink, leak_threshold=leak_threshold)
    adapter = _EngineAdapter(sync_engine, watcher)
    adapter.attach()
    watcher.attach(adapter)
    setattr(sync_engine, _MARK, watcher)
    return watcher
