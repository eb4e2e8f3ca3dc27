"""Slow clients: a request waiting on its client past its timeout is aborted, so a
client that sends its body a byte at a time, or stops reading the response, cannot
hold a database slot.

A cancel scope around every wait would cost more than the rest of the hot path, so a
request only notes when it starts and stops waiting on its client; one watchdog in the
guard's background work looks every :data:`CHECK_INTERVAL` seconds and aborts the
requests past their deadline (by cancelling their task: asyncio servers only, such
as uvicorn; under trio the timeouts are not enforced).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import anyio

__all__ = ["CHECK_INTERVAL", "ClientWatch", "Watched", "current_task", "uncancel"]

CHECK_INTERVAL = 0.1
"""Seconds between two looks; a slow client is let go at most this late."""

STALLED_AFTER = 0.1
"""Seconds a request may wait on its client before it counts as stalled."""


class Watched(Protocol):
    """A request that may wait on its client."""

    client_deadline: float
    """``time.monotonic()`` by which the client must have answered; 0 while not waiting."""
    client_since: float
    """``time.monotonic()`` at which the current wait on the client began."""

    def abort(self) -> None:
        """Stop the request: its client is too slow."""

    def stalled(self) -> None:
        """The client has kept the request waiting for a while (it may let go of its slot)."""


class ClientWatch:
    """The requests that wait on their clients, and the watchdog that lets go of them."""

    def __init__(self) -> None:
        self.requests: set[Watched] = set()
        self.aborted_total = 0
        """Requests aborted because their client was too slow."""
        self._idle: anyio.Event | None = None

    def watch(self, request: Watched) -> None:
        """Look after ``request`` until :meth:`forget`; wakes the watchdog if it sleeps."""
        self.requests.add(request)
        idle = self._idle
        if idle is not None:
            self._idle = None
            idle.set()

    def forget(self, request: Watched) -> None:
        """Stop looking after ``request`` (it ended)."""
        self.requests.discard(request)

    async def run(self) -> None:
        """Abort every request past its client deadline, every CHECK_INTERVAL, forever;
        asleep while no request waits on its client."""
        while True:
            if not self.requests:
                self._idle = idle = anyio.Event()
                await idle.wait()
                continue
            await anyio.sleep(CHECK_INTERVAL)
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        """Abort the requests whose client deadline is before ``now``; tell those waiting
        longer than :data:`STALLED_AFTER` that they are stalled."""
        for request in list(self.requests):
            deadline = request.client_deadline
            if not deadline:
                continue
            if deadline < now:
                self.requests.discard(request)
                self.aborted_total += 1
                request.abort()
            elif now - request.client_since > STALLED_AFTER:
                request.stalled()


def current_task() -> asyncio.Task[object] | None:
    """The running asyncio task, or None (not asyncio): what the watchdog can cancel."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def uncancel(task: asyncio.Task[object] | None) -> None:
    """Undo the watchdog's cancellation once it has been handled (Python 3.11+)."""
    undo = getattr(task, "uncancel", None)
    if undo is not None:
        undo()
