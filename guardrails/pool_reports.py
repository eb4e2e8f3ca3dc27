"""What the guard's pool watchers report, and where it goes.

A pool timeout goes to the request (or guarded call) that met it, which records it
once when it ends, or, outside any, straight to the breaker; a leak suspect goes to
telemetry. A sync pool reports from a worker thread: the report is carried over to
the app's event loop, where breaker listeners, probes and sinks expect to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from guardrails import context
from guardrails.pools import watch

if TYPE_CHECKING:
    from guardrails.guard import Guardrails

__all__ = ["PoolReports"]


class PoolReports:
    """The watchers of one guard's pools, and what becomes of their reports."""

    def __init__(self, guard: Guardrails) -> None:
        self._guard = guard
        self.watchers: list[Any] = []
        """Every watcher made by :meth:`watch`, oldest first."""
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, pool: Any, name: str | None) -> Any:
        """Watch ``pool``, reporting to the guard; returns the watcher."""
        self.remember_loop()
        guard = self._guard
        watcher = watch(pool, sink=guard, leak_threshold=guard.leak_threshold, name=name)
        self.watchers.append(watcher)
        return watcher

    def pool_timeout(self, watcher: Any, exc: BaseException) -> None:
        """A watcher saw a pool timeout (on any thread)."""
        guard = self._guard
        adaptive = guard.limiter.adaptive
        if adaptive is not None:
            adaptive.drop()  # applied by the limiter on the loop, at the window's end
        ctx = context.current()
        if ctx is None:
            pool = getattr(watcher, "name", None)
            self._on_loop(lambda error: guard.breaker.record_outage(error, pool=pool), exc)
        else:
            # The request or guarded call records it when it ends, once, even when the
            # app catches the timeout and answers on its own.
            ctx.outcome.pool_timed_out(exc, getattr(watcher, "name", None))

    def leak_suspect(self, info: Any) -> None:
        """A watcher suspects a leak (on any thread): logged and sent to every sink."""
        self._on_loop(self._report_leak, info)

    def _report_leak(self, info: Any) -> None:
        self._guard.telemetry.event(
            "leak_suspect",
            key=f"{info.pool}:{info.route}",
            level=logging.WARNING,
            message=info.describe(),
            **info.as_dict(),
        )

    def remember_loop(self) -> None:
        """Remember the running event loop as the app's, if there is one."""
        # Set up before the app runs, there is no loop yet: the background work remembers it.
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    def _on_loop(self, func: Callable[[Any], None], arg: Any) -> None:
        """Run ``func(arg)`` on the app's event loop, also when a sync pool calls from a
        worker thread: breaker listeners, probes and sinks expect the loop's thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(func, arg)
                return
        func(arg)
