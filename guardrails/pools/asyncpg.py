"""Watching an ``asyncpg.Pool``.

asyncpg pools have no events, and ``Pool`` uses ``__slots__``, so its methods cannot
be shadowed on the instance. The watcher therefore switches the pool's ``__class__``
to a subclass made for this watcher (``__slots__ = ()``, same layout, so
``isinstance(pool, asyncpg.Pool)`` and every attribute stay as they were) that
overrides only the public ``acquire()`` and ``release()``; ``close()`` switches it
back. No private attribute of asyncpg is read or written.

- ``acquire()`` returns the original acquire context wrapped so that both
  ``await pool.acquire()`` and ``async with pool.acquire()`` are timed; a
  ``TimeoutError`` out of it (``acquire(timeout=...)`` or the connect timeout) is a
  pool timeout. ``Pool.fetch()``, ``execute()`` and friends acquire through it too.
- ``release()`` records the checkin *before* handing the connection back, so the
  next acquirer of the same connection is never confused with this one.
- ``waiting`` counts acquires in progress (queued for a connection, or connecting):
  asyncpg keeps its queue private. ``connects_total`` is not known.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from types import TracebackType
from typing import Any

import asyncpg

from guardrails.pools._core import PoolSink, PoolWatcher, checked_name
from guardrails.pools.fault import inject_async

__all__ = ["watch_asyncpg"]

_MARK = "_guardrails_watcher"


async def _timed(watcher: PoolWatcher, inner: Any, enter: bool) -> Any:
    with watcher.acquiring(asyncio.TimeoutError):  # the builtin one from Python 3.11 on
        fault = watcher.fault
        if fault is not None:
            await inject_async(watcher, fault, _refused)
        connection = await (inner.__aenter__() if enter else inner)
    watcher.checked_out(id(connection))
    return connection


def _refused() -> BaseException:
    return asyncio.TimeoutError("refused by a fault injected for testing")


class _WatchedAcquire:
    """asyncpg's acquire context (awaitable and async context manager), timed."""

    __slots__ = ("_inner", "_watcher")

    def __init__(self, inner: Any, watcher: PoolWatcher) -> None:
        self._inner = inner
        self._watcher = watcher

    def __await__(self) -> Generator[Any, None, Any]:
        return _timed(self._watcher, self._inner, False).__await__()

    async def __aenter__(self) -> Any:
        return await _timed(self._watcher, self._inner, True)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._inner.__aexit__(exc_type, exc, tb)  # calls pool.release(): counted there


class _PoolAdapter:
    kind = "asyncpg"

    def __init__(self, pool: Any, watcher: PoolWatcher) -> None:
        self.pool = pool
        self.watcher = watcher
        self.original: type[Any] = type(pool)
        base = self.original

        def acquire(self: Any, *, timeout: float | None = None) -> _WatchedAcquire:
            return _WatchedAcquire(base.acquire(self, timeout=timeout), watcher)

        async def release(self: Any, connection: Any, *, timeout: float | None = None) -> None:
            watcher.checked_in(id(connection))
            await base.release(self, connection, timeout=timeout)

        acquire.__doc__ = base.acquire.__doc__
        release.__doc__ = base.release.__doc__
        self.watched: type[Any] = type(
            base.__name__,
            (base,),
            {
                "__slots__": (),
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "acquire": acquire,
                "release": release,
                _MARK: watcher,
            },
        )

    def attach(self) -> None:
        self.pool.__class__ = self.watched

    def detach(self) -> None:
        if type(self.pool) is self.watched:
            self.pool.__class__ = self.original

    def stats(self) -> dict[str, Any]:
        return {"size": self.pool.get_max_size(), "waiting": self.watcher.waiting}


def watch_asyncpg(
    pool: asyncpg.Pool,
    *,
    sink: PoolSink | None,
    leak_threshold: float | None,
    name: str | None = None,
) -> PoolWatcher:
    """Watch an ``asyncpg.Pool``; see :func:`guardrails.pools.watch`."""
    if getattr(type(pool), _MARK, None) is not None:
        raise ValueError("this asyncpg pool is already watched; close() its watcher first")
    label = checked_name(name, lambda: "asyncpg")
    watcher = PoolWatcher("asyncpg", label, sink=sink, leak_threshold=leak_threshold)
    adapter = _PoolAdapter(pool, watcher)
    adapter.attach()
    watcher.attach(adapter)
    return watcher
