"""The guard's background work, owned by one task group on the app's event loop.

Three loops run beside the app: the once-a-second sampler (triage and early
warnings), the breaker's recovery probe, and the coordinator's lease exchange. The
app's lifespan owns them (``async with guard`` or ``lifespan=guard.lifespan``), under
asyncio and trio alike. An app that wires neither gets them started on its first
request instead, on asyncio only: once per event loop, never again after a crash,
and never silently (what stopped them is logged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup

__all__ = ["Background"]

logger = logging.getLogger("guardrails")

Job = Callable[[], Coroutine[Any, Any, Any]]


class Background:
    """Runs the guard's background jobs until stopped; see the module docstring."""

    def __init__(self, jobs: Callable[[], Sequence[Job]]) -> None:
        self._jobs = jobs
        self._extra: list[Job] = []
        self._group: TaskGroup | None = None
        self._lazy: list[asyncio.Task[Any]] = []
        self._given_up = False
        self.started = False
        """Whether the jobs run (or were asked to run) now; the middleware's cheap check."""

    async def __aenter__(self) -> Background:
        if self._group is not None:
            raise RuntimeError("the guard's background work is already running: enter it once")
        await self._stop_lazy()
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        self.started = True
        for job in self.jobs():
            group.start_soon(job)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        group, self._group = self._group, None
        self.started = False
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)

    def jobs(self) -> list[Job]:
        """Every job: the guard's own and those added with :meth:`add`."""
        return [*self._jobs(), *self._extra]

    def add(self, job: Job) -> None:
        """Run ``job`` too (e.g. a middleware's watchdog); started now if already running."""
        self._extra.append(job)
        if self._group is not None:
            self._group.start_soon(job)
        elif self._lazy:
            task = self._lazy[0].get_loop().create_task(job())
            task.add_done_callback(self._lazy_ended)
            self._lazy.append(task)

    def start_lazily(self) -> None:
        """Start the jobs from a request, for apps that do not wire the lifespan."""
        if self.started or self._given_up:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._given_up = True
            logger.warning(
                "guardrails: background work (triage sampler, breaker probe, coordinator) "
                "is not running; run the app with lifespan=guard.lifespan or `async with "
                "guard:` to start it on this event loop"
            )
            return
        self.started = True
        # One plain task per job, created now: a loop that shuts down right after this
        # request cancels them with the rest (a task group started later would not be).
        self._lazy = [
            loop.create_task(job(), name=f"guardrails-{getattr(job, '__name__', 'job')}")
            for job in self.jobs()
        ]
        for task in self._lazy:
            task.add_done_callback(self._lazy_ended)

    def _lazy_ended(self, task: asyncio.Task[Any]) -> None:
        if task not in self._lazy:
            return
        if task.cancelled():
            # Its event loop went away (a test client used without `with`): the next
            # request, on its own loop, starts the jobs again.
            logger.debug("guardrails: background work stopped with its event loop")
        elif task.exception() is None:
            return  # a job with nothing to do (no probe configured)
        else:
            self._given_up = True
            exc = task.exception()
            logger.error(
                "guardrails: background work failed and is not restarted: %s",
                type(exc).__name__,
            )
            logger.debug("guardrails: background work failed", exc_info=exc)
        tasks, self._lazy = self._lazy, []
        self.started = False
        for other in tasks:
            other.cancel()

    async def _stop_lazy(self) -> None:
        tasks, self._lazy = self._lazy, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop the jobs, whoever started them."""
        if self._group is not None:
            await self.__aexit__(None, None, None)
        await self._stop_lazy()
        self.started = False
