"""RedisCoordinator: one connection budget and one breaker state shared by many processes.

A background task leases slots from Redis in batches and hands them to the local limiter
with ``set_limit``, so requests never wait on Redis; breaker openings and recoveries go
through Redis too. When Redis is unreachable each process falls back to its own cap.
The parts: :mod:`~guardrails.coordination.lease` (slots),
:mod:`~guardrails.coordination.shared_breaker` (breaker),
:mod:`~guardrails.coordination.events` (pub/sub), :mod:`~guardrails.coordination.link`
(the client) and :mod:`~guardrails.coordination.lua` (keys and scripts); this module
runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from guardrails._redis import Endpoint
from guardrails.budget import ConnectionBudget
from guardrails.coordination.events import listen, publish_command
from guardrails.coordination.lease import Grant, Lease, shares
from guardrails.coordination.link import Link
from guardrails.coordination.lua import Keys, text
from guardrails.coordination.shared_breaker import SharedBreaker
from guardrails.limiter_checks import seconds

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from guardrails.guard import Guardrails

__all__ = ["RedisCoordinator"]

_TICK = 0.05
"""Seconds between local checks of demand and breaker state (no I/O unless needed)."""
_RETRY_INTERVAL = 1.0
"""Most seconds between attempts to reach Redis again after it failed (at most ttl / 3)."""


class RedisCoordinator:
    """Shares one connection budget and one breaker among every process using the same Redis.

    Pass it to the guard; each process builds its own::

        budget = gr.ConnectionBudget(max_connections=100, reserved=10, processes=8)
        guard = gr.Guardrails(concurrency=20, budget=None,
                              coordinator=gr.RedisCoordinator("redis://cache:6379/0",
                                                              budget=budget))

    ``url`` is a Redis URL, or a ``redis.asyncio`` client of your own: ``Redis(...)``,
    ``Sentinel(...).master_for("name")`` or ``RedisCluster(...)`` (a client you pass stays
    yours: it is never closed here).

    - **Global budget**: ``budget`` slots (an int, or a
      :class:`~guardrails.budget.ConnectionBudget`'s ``app_total``) are leased to the
      processes in batches by a background task, as leases that expire after
      ``lease_ttl`` seconds unless renewed: a crashed process's slots come back within
      ``lease_ttl``. Each process asks for what it uses plus ``batch`` spare slots, never
      more than the guard's own ``concurrency``; when processes compete, none keeps more
      than its fair share. The guard's limiter runs on the slots held, so a request makes
      no Redis call at all.
    - **Shared breaker**: when one process's breaker opens, the others open within a
      Redis round trip (pub/sub, with the lease renewal as a backstop); when the open
      period ends, one process (holding a Redis lock) makes the half-open trial and tells
      the others how it went.
    - **Redis down**: every process keeps within its lease while it stands, then within
      both its last share and ``per_process`` slots (default: the budget's
      ``per_process``, else the guard's ``concurrency``), uses its own breaker, logs it
      once, and rejoins when Redis answers again. Each Redis call is cut off after
      ``timeout`` seconds; nothing blocks the event loop.
    - **Redis forgot** (restarted empty, flushed, failed over to a replica): for one
      ``lease_ttl`` nobody is granted more than it already uses, while every process
      puts its use on record again; only then are slots handed out anew.

    Until its first lease arrives (one round trip after it starts) a process admits
    nobody: requests wait in the queue, so a fleet starting at once cannot overrun the
    budget; if Redis has not answered within ``lease_ttl``, it falls back to
    ``per_process``. ``name`` separates budgets sharing one Redis (one per database).
    """

    def __init__(
        self,
        url: str | Redis | RedisCluster,
        *,
        budget: int | ConnectionBudget | None = None,
        per_process: int | None = None,
        name: str = "default",
        lease_ttl: float | timedelta = 3.0,
        batch: int | None = None,
        timeout: float | timedelta = 0.25,
        share_breaker: bool = True,
    ) -> None:
        self._endpoint = Endpoint.of(url, "RedisCoordinator")
        self.url = self._endpoint.url
        """The Redis URL given, or None for a client."""
        if budget is not None and not isinstance(budget, ConnectionBudget):
            _check_slots(budget, "budget", "the number of slots all processes share")
        if per_process is not None:
            _check_slots(per_process, "per_process", "slots per process while Redis is down")
        if batch is not None:
            _check_slots(batch, "batch", "spare slots a process leases beyond its use")
        if not isinstance(name, str) or not name or any(c in name for c in "{} \n"):
            raise ValueError(
                f"name must be a short word without braces or spaces (e.g. 'orders-db'), "
                f"not {name!r}"
            )
        self._budget_given = budget
        self._per_process_given = per_process
        self._batch_given = batch
        self.name = name
        self.lease_ttl = seconds(lease_ttl, "lease_ttl")
        if not self.lease_ttl >= 0.3:
            raise ValueError(
                f"lease_ttl must be at least 0.3 seconds, not {self.lease_ttl!r}: it is how "
                "long a crashed process's slots stay taken (3 is a common choice)"
            )
        self.timeout = seconds(timeout, "timeout")
        if not 0 < self.timeout < self.lease_ttl / 3:
            raise ValueError(
                f"timeout must be above 0 and below lease_ttl / 3 ({self.lease_ttl / 3:g} s), "
                f"not {self.timeout!r}: a lease must be renewable before it expires"
            )
        if not isinstance(share_breaker, bool):
            raise TypeError(f"share_breaker must be True or False, not {share_breaker!r}")
        self.share_breaker = share_breaker
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        """This process's name in Redis (host, pid and a random part)."""
        self._keys = Keys.of(name)
        self._guard: Guardrails | None = None
        self.budget = 0
        """Slots shared by every process (known once attached)."""
        self.per_process = 0
        """Slots this process uses while Redis is unreachable."""
        self.batch = 1
        self._lease = Lease(
            self.process_id,
            self._keys,
            self.lease_ttl,
            publish=publish_command(self._endpoint.cluster),
        )
        self._shared: SharedBreaker | None = None
        """The shared breaker, once attached with ``share_breaker``."""
        self._link = Link(
            self._endpoint,
            self.timeout,
            retry_interval=min(_RETRY_INTERVAL, self.lease_ttl / 3),
            patience=self.lease_ttl,
        )
        self._closing = False
        self._wake: asyncio.Event | None = None
        self.renewals_total = 0
        self.generations_total = 0
        """Times Redis was seen to have forgotten the records (restart, flush, failover)."""

    @property
    def errors_total(self) -> int:
        """Redis calls that failed (timeouts, refused connections, errors)."""
        return self._link.errors_total

    @property
    def remote_opens_total(self) -> int:
        """Times another process's opening opened this process's breaker."""
        return self._shared.remote_opens if self._shared is not None else 0

    # -- Coordinator protocol ----------------------------------------------------------

    def attach(self, guard: Guardrails) -> None:
        """Bind to ``guard`` (its constructor calls this) and admit nobody until leased."""
        if self._guard is not None:
            raise RuntimeError(
                "this RedisCoordinator already serves another Guardrails: make one per guard"
            )
        self.budget, self.per_process, self.batch = shares(
            self._budget_given,
            guard.budget,
            self._per_process_given,
            self._batch_given,
            guard.limiter.configured_limit,
        )
        self._guard = guard
        # The startup window: no slot is ours until Redis says so (or proves unreachable).
        guard.limiter.set_limit(0)
        if self.share_breaker:
            self._shared = SharedBreaker(
                guard.breaker,
                self.process_id,
                self._keys,
                self._wake_up,
                publish=publish_command(self._endpoint.cluster),
            )

    async def start(self) -> None:
        """Lease, renew and listen until :meth:`aclose`; run by the guard on its event loop."""
        if self._closing:
            return  # closed for good: a closed guard never leases again
        guard = self._require_guard()
        self._wake = asyncio.Event()
        link = self._link
        events = listen(
            lambda: link.client if link.connected else None,
            lambda: self._lease.generation,
            self._keys.channel,
            sharded=self._endpoint.cluster,
            timeout=self.timeout,
            retry_interval=_RETRY_INTERVAL,
            deliver=self._on_message,
            running=lambda: not self._closing,
        )
        listener = asyncio.get_running_loop().create_task(events, name="guardrails-redis-events")
        try:
            await self._run(guard)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    def _on_message(self, data: object) -> None:
        """Another process's news: a request for slots ("need ..."), or the breaker's."""
        if isinstance(data, bytes | str):
            kind, _, rest = text(data).partition(" ")
            if kind == "need":
                fair, _, sender = rest.partition(" ")
                if sender != self.process_id and fair.isdigit():
                    self._lease.asked(int(fair))
                    self._wake_up()
                return
        if self._shared is not None:
            self._shared.on_message(data)

    async def aclose(self) -> None:
        """Give this process's slots back and close the Redis connections."""
        if self._closing:
            return
        self._closing = True
        guard = self._guard
        if guard is not None:
            # Admit nobody on slots that are about to be given back.
            guard.limiter.set_limit(0)
        self._wake_up()
        link = self._link
        if link.connected and guard is not None and link.scripts is not None:
            # Shutting down: if this fails the lease expires by itself anyway.
            with contextlib.suppress(Exception):
                await self._lease.give_back(link.scripts, guard.limiter.in_flight, self.budget)
        await link.aclose()

    def snapshot(self) -> dict[str, Any]:
        """Mode, budget, slots held and wanted, processes seen, counters: as plain data."""
        guard = self._guard
        lease = self._lease
        connected = self._link.connected
        settling = lease.settling(time.monotonic()) if connected else None
        if connected:
            mode = "shared" if settling is None else "settling"
        elif self._link.ever_connected or self.errors_total:
            mode = "local"
        else:
            mode = "starting"
        return {
            "kind": "redis",
            "redis": self._endpoint.where,
            "name": self.name,
            "process": self.process_id,
            "mode": mode,
            "connected": connected,
            "budget": self.budget,
            "per_process": self.per_process,
            "held": lease.held if connected else None,
            "share": lease.held if lease.ever_leased else None,
            "want": lease.want,
            "limit": guard.limiter.limit if guard is not None else None,
            "processes": lease.processes if connected else None,
            "fair_share": lease.fair if connected else None,
            "settling": None if settling is None else round(settling, 3),
            "lease_ttl": self.lease_ttl,
            "batch": self.batch,
            "share_breaker": self.share_breaker,
            "trial_owner": self._shared is not None and self._shared.trial_owner,
            "renewals_total": self.renewals_total,
            "generations_total": self.generations_total,
            "errors_total": self.errors_total,
            "remote_opens_total": self.remote_opens_total,
            "last_error": self._link.last_error,
        }

    # -- the loop ----------------------------------------------------------------------

    def _require_guard(self) -> Guardrails:
        if self._guard is None:
            raise RuntimeError("pass the coordinator to Guardrails(coordinator=...) first")
        return self._guard

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self, guard: Guardrails) -> None:
        wake = self._wake
        assert wake is not None
        limiter = guard.limiter
        lease = self._lease
        shared = self._shared
        link = self._link
        while not self._closing:
            now = time.monotonic()
            lease.note_demand(limiter)
            if link.steady:
                due = lease.due(now, limiter, self.timeout) or (
                    shared is not None and shared.pending is not None
                )
            else:
                due = link.ready()
            if link.lost:
                lease.fall_back(limiter, self.per_process)
            if due:
                try:
                    await self._exchange(guard)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failed(guard, exc)
            if link.steady and shared is not None:
                try:
                    await shared.coordinate_trial(link.open())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failed(guard, exc)
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), _TICK)

    async def _exchange(self, guard: Guardrails) -> None:
        """Tell breaker news, then renew the lease: usually one round trip in all."""
        link = self._link
        scripts = link.open()
        await link.follow()
        shared = self._shared
        if shared is not None:
            await shared.tell(scripts)
        grant = await self._lease.renew(
            scripts,
            guard.limiter,
            connected=link.connected,
            budget=self.budget,
            batch=self.batch,
        )
        if self._closing:
            return  # closed meanwhile: aclose gives the lease back
        first = not link.ever_connected
        known = self._lease.generation
        self._lease.take(grant)
        self.renewals_total += 1
        if link.succeeded() and not (first and not link.errors_total):
            self._rejoined(guard)
        if known and grant.generation != known:
            self._forgotten(guard, grant)
        guard.limiter.set_limit(grant.grant)
        if shared is not None:
            shared.reconcile(grant.breaker_ms, grant.opening)

    def _failed(self, guard: Guardrails, exc: BaseException) -> None:
        self._lease.failed()
        link = self._link
        was_lost = link.lost
        if not link.failed(exc, lease_stands=time.monotonic() < self._lease.until):
            return
        if self._closing:
            return
        if not was_lost:
            self._announce(
                guard,
                connected=False,
                level=logging.WARNING,
                message=f"Redis at {self._endpoint.where} unreachable "
                f"({type(exc).__name__}): the local breaker, and at most "
                f"{self.per_process} local slots once its lease runs out, until Redis answers",
            )
        if self._shared is not None:
            self._shared.lost()
        guard.breaker.hold = False
        self._lease.fall_back(guard.limiter, self.per_process)

    def _announce(self, guard: Guardrails, *, connected: bool, level: int, message: str) -> None:
        """Log and tell the sinks that the link to Redis changed (a transition)."""
        guard.telemetry.event(
            "coordinator",
            transition=True,
            connected=connected,
            redis=self._endpoint.where,
            level=level,
            message=message,
        )

    def _rejoined(self, guard: Guardrails) -> None:
        self._announce(
            guard,
            connected=True,
            level=logging.INFO,
            message=f"Redis at {self._endpoint.where} answers again: sharing a budget of "
            f"{self.budget} slots",
        )

    def _forgotten(self, guard: Guardrails, grant: Grant) -> None:
        """Redis no longer has the records this process knew: a restart, flush or failover."""
        self.generations_total += 1
        self._announce(
            guard,
            connected=True,
            level=logging.WARNING,
            message=f"Redis at {self._endpoint.where} lost the budget's records (restarted, "
            f"flushed or failed over): no process is granted more than it uses for "
            f"{grant.settling_ms / 1000:g} s, while every process records its use again",
        )


def _check_slots(value: object, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1 ({hint}), not {value!r}")
