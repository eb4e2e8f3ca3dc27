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


class Watched(Protocol):
    """A request that may wait on its client."""

    client_deadline: float
    """``time.monotonic()`` by which the client must have answered; 0 while not waiting."""

    def abort(self) -> None:
        """Stop the request: its client is too slow."""

    def stalled(self) -> None:
        """The client has kept the request waiting since the last look or longer (it may
        let go of its slot)."""


class ClientWatch:
    """The requests that wait on their clients, and the watchdog that lets go of them."""

    def __init__(self) -> None:
        self.requests: dict[Watched, float] = {}
        """The requests looked after, each with the deadline it was waiting on at the
        last look (0: none), so the watchdog knows who kept waiting since."""
        self.aborted_total = 0
        """Requests aborted because their client was too slow."""
        self._idle: anyio.Event | None = None

    def watch(self, request: Watched) -> None:
        """Look after ``request`` until :meth:`forget`; wakes the watchdog if it sleeps."""
        self.requests[request] = 0.0
        idle = self._idle
        if idle is not None:
            self._idle = None
            idle.set()

    def forget(self, request: Watched) -> None:
        """Stop looking after ``request`` (it ended)."""
        self.requests.pop(request, None)

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
        """Abort the requests whose client deadline is before ``now``; tell those found
        waiting on the same deadline at the last look too that they are stalled."""
        requests = self.requests
        for request, seen in list(requests.items()):
            deadline = request.client_deadline
            if deadline and deadline < now:
                requests.pop(request, None)
                self.aborted_total += 1
                request.abort()
            elif deadline and deadline == seen:
                request.stalled()  # the same wait as at the last look: at least an interval
            elif request in requests:
                requests[request] = deadline


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
