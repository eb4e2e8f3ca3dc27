"""The coordinator's link to Redis: its client and scripts, and whether Redis answers.

Up, asking once more (one failed call is often a stall, not an outage), or lost; and,
once lost, when to ask again. It knows nothing of leases or breakers: the coordinator
decides what each state means for the slots.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from guardrails._redis import Endpoint, Outage, follow_master
from guardrails.coordination.lease import MIN_GAP
from guardrails.coordination.lua import Scripts

__all__ = ["Link"]


class Link:
    """The client of one coordinator (made on first use), and the state of its calls."""

    __slots__ = (
        "_outage",
        "_since",
        "client",
        "connected",
        "endpoint",
        "errors_total",
        "ever_connected",
        "last_error",
        "lost",
        "patience",
        "retry_interval",
        "retrying",
        "scripts",
        "timeout",
    )

    def __init__(
        self, endpoint: Endpoint, timeout: float, retry_interval: float, patience: float
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        """Seconds each call may take."""
        self.retry_interval = retry_interval
        """Seconds between attempts while lost, once our lease has run out."""
        self.patience = patience
        """Seconds a process that never reached Redis keeps asking before it counts it lost."""
        self._since: float | None = None
        self.client: Any = None
        self.scripts: Scripts | None = None
        self.connected = False
        """The last call was answered (or only one failed since)."""
        self.ever_connected = False
        self.retrying = False
        """One call failed while connected: the next one decides whether Redis is lost."""
        self.lost = False
        """Redis was declared lost and has not answered since."""
        self.errors_total = 0
        self.last_error: str | None = None
        self._outage = Outage(retry_interval)

    @property
    def steady(self) -> bool:
        """Connected, with no failure pending: calls follow the lease's schedule."""
        return self.connected and not self.retrying

    def ready(self) -> bool:
        """After a failure: may Redis be asked again now?"""
        return self._outage.ready()

    def open(self) -> Scripts:
        """The client and its scripts, made on first use (no I/O): a failure is an outage too."""
        if self.scripts is None:
            client = self.endpoint.connect(self.timeout)
            self.scripts = Scripts(client, self.timeout)
            self.client = client
        return self.scripts

    async def follow(self) -> None:
        """With Sentinels, make sure the next call goes to the master they name now."""
        if self.endpoint.sentinel:
            await asyncio.wait_for(follow_master(self.client), self.timeout)

    def succeeded(self) -> bool:
        """A call was answered; True when it ends an outage or is the first answer."""
        self.retrying = False
        self._outage.succeeded()
        rejoined = not self.connected
        self.connected = True
        self.ever_connected = True
        self.lost = False
        return rejoined

    def failed(self, exc: BaseException, *, lease_stands: bool) -> bool:
        """A call failed; True when Redis now counts as lost.

        The first failure while connected is asked again after ``MIN_GAP``; the next one
        declares it lost. Before Redis ever answered, it is asked every ``MIN_GAP`` for
        :attr:`patience` seconds first: a slow start is not an outage. While
        ``lease_stands``, Redis is asked again often (an answer in time keeps our slots),
        else every :attr:`retry_interval` seconds.
        """
        self.errors_total += 1
        self.last_error = type(exc).__name__
        if self.connected and not self.retrying:
            self.retrying = True
            self._outage.failed(MIN_GAP)
            return False
        if not self.ever_connected and not self.lost:
            now = time.monotonic()
            if self._since is None:
                self._since = now
            if now - self._since < self.patience:
                self._outage.failed(MIN_GAP)
                return False
        self.retrying = False
        self._outage.failed(MIN_GAP if lease_stands else self.retry_interval)
        self.connected = False
        self.lost = True
        return True

    async def aclose(self) -> None:
        """Close the client if guardrails made it; a client the user passed stays open."""
        client, self.client, self.scripts = self.client, None, None
        if client is not None and self.endpoint.owned:
            try:
                await client.aclose()
            except Exception:  # shutting down: nothing left to protect
                return
