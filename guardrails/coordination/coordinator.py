"""RedisCoordinator: one connection budget and one breaker state shared by many processes.

A background task leases slots from Redis in batches and hands them to the local limiter
with ``set_limit``, so requests never wait on Redis; breaker openings and recoveries go
through Redis too. When Redis is unreachable each process falls back to its own cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from guardrails._redis import Outage, check_url, connect, require, where
from guardrails.breaker import CLOSED, HALF_OPEN, OPEN
from guardrails.budget import ConnectionBudget
from guardrails.limiter import seconds

if TYPE_CHECKING:
    from guardrails.guard import Guardrails

__all__ = ["RedisCoordinator"]

logger = logging.getLogger("guardrails")

T = TypeVar("T")

_TICK = 0.05
"""Seconds between local checks of demand and breaker state (no I/O unless needed)."""
_MIN_GAP = 0.1
"""Least time between two lease calls of one process, however starved it is."""
_RETRY_INTERVAL = 1.0
"""Seconds between attempts to reach Redis again after it failed."""

# One call per renewal: drop expired leases, grant from what the others leave, record the
# lease, and report the shared breaker. Times are Redis's own (TIME), so process clocks
# never matter. ``need`` is what a process used lately, ``want`` adds spare slots. While
# some process needs more than it holds, nobody is granted more than it needs nor more
# than ceil(budget / processes that need slots): spare slots go back to where the work
# is, and idle processes (need 0) neither hold them nor shrink the others' fair share.
_LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, want, need = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local floor, budget, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, m in ipairs(expired) do
  redis.call('HDEL', KEYS[2], m)
  redis.call('HDEL', KEYS[3], m)
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local held = redis.call('HGETALL', KEYS[2])
local others, active, contended = 0, 0, 0
if need > 0 then active = 1 end
for i = 1, #held, 2 do
  local m = held[i]
  if m ~= me then
    local h = tonumber(held[i + 1])
    others = others + h
    local n = tonumber(redis.call('HGET', KEYS[3], m) or h)
    if n > 0 then active = active + 1 end
    if n > h then contended = 1 end
  end
end
local fair = math.ceil(budget / math.max(active, 1))
local grant = math.min(want, budget - others)
if contended == 1 then grant = math.min(grant, fair, need) end
if grant < 0 then grant = 0 end
local record = math.max(grant, floor)
if record == 0 and want == 0 then
  redis.call('ZREM', KEYS[1], me)
  redis.call('HDEL', KEYS[2], me)
  redis.call('HDEL', KEYS[3], me)
else
  redis.call('ZADD', KEYS[1], now + ttl, me)
  redis.call('HSET', KEYS[2], me, record)
  redis.call('HSET', KEYS[3], me, need)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], 2 * ttl) end
end
local remaining = -1
local b = redis.call('GET', KEYS[4])
if b then
  local until_ms = tonumber(string.match(b, '^(%d+)'))
  remaining = math.max(0, until_ms - now)
end
return {grant, record, active, fair, contended, remaining, b or ''}
"""

# The breaker key holds "<end of open period, Redis ms>:<opener>"; it outlives the period
# (a trial still has to succeed) and is deleted when a trial closes the breaker. ARGV[4]
# '1' re-tells an old opening Redis lost: it must not replace a newer one written since.
_OPEN_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local remaining, linger = tonumber(ARGV[1]), tonumber(ARGV[2])
local value = (now + remaining) .. ':' .. ARGV[3]
if ARGV[4] == '1' then
  if redis.call('GET', KEYS[1]) then return false end
end
redis.call('SET', KEYS[1], value, 'PX', remaining + linger)
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', KEYS[3], 'open ' .. remaining .. ' ' .. ARGV[3] .. ' ' .. value)
return value
"""

# Close only the opening this process's trial answers for: after an outage another
# process may have opened the breaker anew, and a stale "closed" must not close everyone's.
# No opening on record (Redis restarted) closes nothing either: the renewals close the
# others once nobody tells Redis of an opening.
_CLOSE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', KEYS[3], 'closed 0 ' .. ARGV[1])
return 1
"""

# Take the half-open trial lock, or keep it while our trial runs (extend only then, so an
# idle owner lets another process try once the lock lapses).
_TRIAL_SCRIPT = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  if ARGV[3] == '1' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  return 1
end
if owner then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class RedisCoordinator:
    """Shares one connection budget and one breaker among every process using the same Redis.

    Pass it to the guard; each process builds its own::

        budget = gr.ConnectionBudget(max_connections=100, reserved=10, processes=8)
        guard = gr.Guardrails(concurrency=20, budget=None,
                              coordinator=gr.RedisCoordinator("redis://cache:6379/0",
                                                              budget=budget))

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
    - **Redis down**: every process falls back to ``per_process`` slots (default: the
      budget's ``per_process``, else the guard's ``concurrency``) and its own breaker,
      logs it once, and rejoins when Redis answers again. Each Redis call is cut off
      after ``timeout`` seconds; nothing blocks the event loop.

    Until its first lease arrives (one round trip after the first request) a process
    admits nobody: requests wait in the queue, so a fleet starting at once cannot
    overrun the budget. ``name`` separates budgets sharing one Redis (one per database).
    """

    def __init__(
        self,
        url: str,
        *,
        budget: int | ConnectionBudget | None = None,
        per_process: int | None = None,
        name: str = "default",
        lease_ttl: float | timedelta = 3.0,
        batch: int | None = None,
        timeout: float | timedelta = 0.25,
        share_breaker: bool = True,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url must be a Redis URL string, not {type(url).__name__}")
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "url must be a Redis URL such as 'redis://127.0.0.1:6379/0' (or rediss://, "
                f"unix://), not one with scheme {urlsplit(url).scheme!r}"
            )
        require("RedisCoordinator")
        check_url(url)
        self.url = url
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
        ns = f"guardrails:{{{name}}}"  # one hash tag: every key in one cluster slot
        self._leases = f"{ns}:leases"
        self._held_key = f"{ns}:held"
        self._wants_key = f"{ns}:wants"
        self._breaker_key = f"{ns}:breaker"
        self._trial_key = f"{ns}:trial"
        self._channel = f"{ns}:events"
        self._guard: Guardrails | None = None
        self.budget = 0
        """Slots shared by every process (known once attached)."""
        self.per_process = 0
        """Slots this process uses while Redis is unreachable."""
        self.batch = 1
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._connected = False
        self._ever_connected = False
        self._retrying = False
        """One call failed while connected: the next one decides whether Redis is lost."""
        self._local = False
        """Redis was declared lost: the local cap applies once our lease has run out."""
        self._closing = False
        self._held = 0
        self._want = 0
        self._peak = 0
        self._processes = 0
        self._fair = 0
        self._contended = False
        self._next_call = 0.0
        self._outage = Outage(_RETRY_INTERVAL)
        self._last_call = -math.inf
        self._lease_until = 0.0
        self._opening: str | None = None
        """The shared breaker key's value this process last saw: the opening it may close."""
        self._pending: str | None = None
        """Breaker news not yet told to Redis: "open", "reopen" (an opening Redis lost,
        told again) or "closed" (the latest wins)."""
        self._next_trial_check = 0.0
        self._wake: asyncio.Event | None = None
        self._applying = False
        self._source_open = False
        self._trial_owner = False
        self._remote_opened = False
        self.renewals_total = 0
        self.errors_total = 0
        self.remote_opens_total = 0
        self._last_error: str | None = None

    # -- Coordinator protocol ----------------------------------------------------------

    def attach(self, guard: Guardrails) -> None:
        """Bind to ``guard`` (its constructor calls this) and admit nobody until leased."""
        if self._guard is not None:
            raise RuntimeError(
                "this RedisCoordinator already serves another Guardrails: make one per guard"
            )
        limiter = guard.limiter
        given = self._budget_given
        if given is None:
            if guard.budget is None:
                raise ValueError(
                    "RedisCoordinator needs the global budget: RedisCoordinator(url, "
                    "budget=N) or Guardrails(budget=ConnectionBudget(...))"
                )
            given = guard.budget
        fallback: int | None
        if isinstance(given, ConnectionBudget):
            self.budget = given.app_total
            fallback = given.per_process
        else:
            self.budget = given
            fallback = guard.budget.per_process if guard.budget is not None else None
        if self._per_process_given is not None:
            fallback = self._per_process_given
        if fallback is None:
            fallback = limiter.configured_limit
        self.per_process = max(1, min(fallback, limiter.configured_limit))
        self.batch = self._batch_given or max(1, math.ceil(limiter.configured_limit / 4))
        self._guard = guard
        # The startup window: no slot is ours until Redis says so (or proves unreachable).
        limiter.set_limit(0)
        guard.breaker.add_listener(self._breaker_changed)

    async def start(self) -> None:
        """Lease, renew and listen until :meth:`aclose`; run by the guard on its event loop."""
        if self._closing:
            return  # closed for good: a closed guard never leases again
        guard = self._require_guard()
        self._wake = asyncio.Event()
        listener = (
            asyncio.get_running_loop().create_task(self._listen(), name="guardrails-redis-events")
            if self.share_breaker
            else None
        )
        try:
            await self._run(guard)
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)

    async def aclose(self) -> None:
        """Give this process's slots back and close the Redis connections."""
        if self._closing:
            return
        self._closing = True
        guard = self._guard
        if guard is not None:
            # Admit nobody on slots that are about to be given back.
            guard.limiter.set_limit(0)
        if self._wake is not None:
            self._wake.set()
        client, self._client = self._client, None
        if client is None:
            return
        if self._connected and guard is not None:
            # Shutting down: if this fails the lease expires by itself anyway.
            with contextlib.suppress(Exception):
                await self._bounded(
                    self._scripts["lease"](
                        keys=self._lease_keys(),
                        args=[self.process_id, 0, 0, guard.limiter.in_flight, self.budget, 1],
                    )
                )
        with contextlib.suppress(Exception):
            await client.aclose()

    def snapshot(self) -> dict[str, Any]:
        """Mode, budget, slots held and wanted, processes seen, counters: as plain data."""
        guard = self._guard
        if self._connected:
            mode = "shared"
        elif self._ever_connected or self.errors_total:
            mode = "local"
        else:
            mode = "starting"
        return {
            "kind": "redis",
            "redis": where(self.url),
            "name": self.name,
            "process": self.process_id,
            "mode": mode,
            "connected": self._connected,
            "budget": self.budget,
            "per_process": self.per_process,
            "held": self._held if self._connected else None,
            "want": self._want,
            "limit": guard.limiter.limit if guard is not None else None,
            "processes": self._processes if self._connected else None,
            "fair_share": self._fair if self._connected else None,
            "lease_ttl": self.lease_ttl,
            "batch": self.batch,
            "share_breaker": self.share_breaker,
            "trial_owner": self._trial_owner,
            "renewals_total": self.renewals_total,
            "errors_total": self.errors_total,
            "remote_opens_total": self.remote_opens_total,
            "last_error": self._last_error,
        }

    # -- the loop ----------------------------------------------------------------------

    def _require_guard(self) -> Guardrails:
        if self._guard is None:
            raise RuntimeError("pass the coordinator to Guardrails(coordinator=...) first")
        return self._guard

    def _connect(self) -> None:
        """Create the client and its scripts (no I/O): a failure here is an outage too."""
        if self._client is not None:
            return
        client = connect(self.url, self.timeout)
        self._scripts = {
            key: client.register_script(source)
            for key, source in (
                ("lease", _LEASE_SCRIPT),
                ("open", _OPEN_SCRIPT),
                ("close", _CLOSE_SCRIPT),
                ("trial", _TRIAL_SCRIPT),
            )
        }
        self._client = client

    async def _bounded(self, call: Awaitable[T]) -> T:
        return await asyncio.wait_for(call, self.timeout)

    def _lease_keys(self) -> list[str]:
        return [self._leases, self._held_key, self._wants_key, self._breaker_key]

    async def _run(self, guard: Guardrails) -> None:
        wake = self._wake
        assert wake is not None
        limiter = guard.limiter
        while not self._closing:
            now = time.monotonic()
            demand = limiter.in_flight + limiter.queued
            if demand > self._peak:
                self._peak = demand
            if self._connected and not self._retrying:
                starving = limiter.queued > 0 and self._held < limiter.configured_limit
                due = (
                    now >= self._next_call
                    or self._pending is not None
                    or (starving and now - self._last_call >= _MIN_GAP)
                    or now >= self._lease_until - self.timeout
                )
            else:
                due = self._outage.ready()
            if self._local:
                self._fall_back(guard)
            if due:
                try:
                    await self._exchange(guard)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failed(guard, exc)
            if self._connected and not self._retrying and self.share_breaker:
                try:
                    await self._coordinate_trial(guard)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failed(guard, exc)
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), _TICK)

    async def _exchange(self, guard: Guardrails) -> None:
        """Publish breaker news, then renew the lease: usually one round trip in all."""
        limiter = guard.limiter
        self._connect()
        pending = self._pending
        if pending is not None:
            await self._publish(guard, pending)
            if self._pending == pending:
                self._pending = None
        sent = time.monotonic()
        leased = self._connected or sent < self._lease_until
        need = min(limiter.configured_limit, self._peak)
        want = min(limiter.configured_limit, need + self.batch)
        if leased:
            # Keep on record only the work running now and, under overload, what we may
            # keep: all we need, or no more than the fair share while others wait.
            keep = min(need, self._fair) if self._contended else need
            floor = min(self._held, max(limiter.in_flight, keep))
            # Shrink locally before asking, so that whatever Redis answers, our use stays
            # within what it has on record for us (arrivals meanwhile wait one round trip).
            if floor < limiter.limit:
                limiter.set_limit(floor)
        else:
            # No lease of ours in Redis (starting, or local since it expired): record the
            # work running now; the local cap stays until Redis answers, as an attempt
            # that fails must not cut the local capacity.
            floor = limiter.in_flight
        result = await self._bounded(
            self._scripts["lease"](
                keys=self._lease_keys(),
                args=[
                    self.process_id,
                    want,
                    need,
                    floor,
                    self.budget,
                    int(self.lease_ttl * 1000),
                ],
            )
        )
        grant, record, active, fair, contended, remaining = (int(v) for v in result[:6])
        opening = _text(result[6])
        if self._closing:
            return  # closed meanwhile: aclose gives the lease back
        self._retrying = False
        self._outage.succeeded()
        self._held = record
        self._want = want
        self._peak = 0
        self._processes = active
        self._fair = fair
        self._contended = bool(contended)
        self._lease_until = sent + self.lease_ttl
        self._last_call = sent
        self.renewals_total += 1
        # Held above the fair share while others wait: come back soon to give it up.
        renew = self.lease_ttl / 3
        self._next_call = sent + (_MIN_GAP if self._contended and record > fair else renew)
        if not self._connected:
            self._rejoined(guard)
        limiter.set_limit(grant)
        if self.share_breaker:
            self._reconcile_breaker(guard, remaining, opening)

    def _failed(self, guard: Guardrails, exc: BaseException) -> None:
        self.errors_total += 1
        self._last_error = type(exc).__name__
        if self._connected and not self._retrying and not self._closing:
            # One lost reply is often a stall, not an outage, and our lease stands:
            # ask once more soon before going local.
            self._retrying = True
            self._outage.failed(_MIN_GAP)
            return
        self._lost(guard, exc)

    def _lost(self, guard: Guardrails, exc: BaseException) -> None:
        self._outage.failed()
        self._retrying = False
        if self._closing:
            return
        if self._connected or (not self._ever_connected and self.errors_total == 1):
            guard.telemetry.event(
                "coordinator",
                transition=True,
                connected=False,
                redis=where(self.url),
                level=logging.WARNING,
                message=f"Redis at {where(self.url)} unreachable ({type(exc).__name__}): "
                f"the local breaker, and {self.per_process} local slots once its lease runs "
                "out, until Redis answers",
            )
        self._connected = False
        self._local = True
        self._trial_owner = False
        guard.breaker.hold = False
        self._fall_back(guard)

    def _fall_back(self, guard: Guardrails) -> None:
        """Local mode: stay within our lease while Redis still counts it, then the cap."""
        limiter = guard.limiter
        if time.monotonic() < self._lease_until:
            # The others hold the rest of the budget: more would overrun it.
            limit = min(limiter.limit, self._held)
        else:
            limit = self.per_process
        if limiter.limit != limit:
            limiter.set_limit(limit)

    def _rejoined(self, guard: Guardrails) -> None:
        first = not self._ever_connected
        self._local = False
        self._connected = True
        self._ever_connected = True
        if first and not self.errors_total:
            return
        guard.telemetry.event(
            "coordinator",
            transition=True,
            connected=True,
            redis=where(self.url),
            level=logging.INFO,
            message=f"Redis at {where(self.url)} answers again: sharing a budget of "
            f"{self.budget} slots",
        )

    # -- the shared breaker ------------------------------------------------------------

    def _breaker_changed(self, old: str | None, new: str, snapshot: dict[str, Any]) -> None:
        if self._applying or not self.share_breaker:
            return
        guard = self._guard
        if guard is None:
            return
        if new == OPEN:
            self._source_open = True
            self._pending = "open"
        elif new == CLOSED:
            self._source_open = False
            self._pending = "closed"
        else:
            return
        self._trial_owner = False
        if self._wake is not None:
            self._wake.set()

    async def _publish(self, guard: Guardrails, kind: str) -> None:
        if kind in ("open", "reopen"):
            period = int(guard.breaker.opened_remaining() * 1000)
            linger = int((guard.breaker.settings.reset_timeout + 30.0) * 1000)
            written = await self._bounded(
                self._scripts["open"](
                    keys=[self._breaker_key, self._trial_key, self._channel],
                    args=[period, linger, self.process_id, "1" if kind == "reopen" else "0"],
                )
            )
            if written is not None:
                self._opening = _text(written)
        else:
            await self._bounded(
                self._scripts["close"](
                    keys=[self._breaker_key, self._trial_key, self._channel],
                    args=[self.process_id, self._opening or ""],
                )
            )

    def _apply_open(self, guard: Guardrails, remaining: float) -> None:
        breaker = guard.breaker
        self._applying = True
        try:
            if breaker.state == CLOSED:
                self.remote_opens_total += 1
                self._remote_opened = True
            breaker.force_open(remaining)
        finally:
            self._applying = False
        breaker.hold = True
        self._trial_owner = False

    def _apply_close(self, guard: Guardrails) -> None:
        breaker = guard.breaker
        self._applying = True
        try:
            breaker.force_close()
        finally:
            self._applying = False
        breaker.hold = False
        self._remote_opened = False
        self._source_open = False
        self._trial_owner = False

    def _reconcile_breaker(self, guard: Guardrails, remaining_ms: int, opening: str) -> None:
        """The renewal's view of the shared breaker: catches a missed pub/sub message."""
        state = guard.breaker.state
        if remaining_ms >= 0:
            if state != HALF_OPEN:
                # A running trial answers for the opening it started under, not a newer one.
                self._opening = opening
            if state == CLOSED:
                self._apply_open(guard, remaining_ms / 1000)
        elif state != CLOSED and self._pending is None:
            if self._source_open:
                # Redis lost the news (restarted): tell it again, unless another
                # process has told it of a newer opening meanwhile.
                self._pending = "reopen"
            elif not self._trial_owner:
                self._apply_close(guard)

    async def _coordinate_trial(self, guard: Guardrails) -> None:
        breaker = guard.breaker
        if breaker.state == CLOSED:
            breaker.hold = False
            self._trial_owner = False
            return
        if breaker.state == OPEN and breaker.opened_remaining() > 0:
            breaker.hold = True
            self._trial_owner = False
            return
        # The open period is over (or our trial is running): one process tests.
        now = time.monotonic()
        if now < self._next_trial_check:
            return
        self._next_trial_check = now + 4 * _TICK
        running = breaker.state == HALF_OPEN
        lock_ttl = int(max(1.0, breaker.settings.probe_timeout + 0.5) * 1000)
        owner = await self._bounded(
            self._scripts["trial"](
                keys=[self._trial_key],
                args=[self.process_id, lock_ttl, "1" if running else "0"],
            )
        )
        self._trial_owner = bool(int(owner))
        breaker.hold = not self._trial_owner

    async def _listen(self) -> None:
        guard = self._require_guard()
        while not self._closing:
            client = self._client
            if client is None or not self._connected:
                await asyncio.sleep(_TICK)
                continue
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await self._bounded(pubsub.subscribe(self._channel))
                while not self._closing and self._connected:
                    message = await pubsub.get_message(timeout=_TICK * 4)
                    if message is not None:
                        self._on_message(guard, message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception:
                # The lease loop notices and reports the outage; just listen again later.
                await asyncio.sleep(_RETRY_INTERVAL)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _on_message(self, guard: Guardrails, data: object) -> None:
        if not isinstance(data, bytes):
            return
        kind, _, rest = data.decode("utf-8", "replace").partition(" ")
        amount, _, rest = rest.partition(" ")
        sender, _, opening = rest.partition(" ")
        if sender == self.process_id:
            return
        if kind == "open" and amount.isdigit():
            self._opening = opening or None
            self._apply_open(guard, int(amount) / 1000)
        elif kind == "closed" and guard.breaker.state != CLOSED:
            self._apply_close(guard)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _check_slots(value: object, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1 ({hint}), not {value!r}")
