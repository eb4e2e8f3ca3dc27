"""The bookkeeping every pool adapter shares: checkouts, acquire waits, leak suspects.

Adapters only say what happened (an acquire started, a connection was checked out or
in, an acquire timed out); :class:`PoolWatcher` keeps the numbers and reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from guardrails import context
from guardrails.context import NO_REQUEST
from guardrails.observe.stats import percentile
from guardrails.observe.telemetry import Histogram
from guardrails.pools.stacks import Frames, capture_stack, format_stack

if TYPE_CHECKING:
    from guardrails.pools.fault import AcquireFault

__all__ = [
    "NO_REQUEST",
    "Adapter",
    "LeakSuspect",
    "PoolSink",
    "PoolWatcher",
    "capture_stack",
    "request_finished",
]

logger = logging.getLogger("guardrails.pools")

OVER_THRESHOLD = "held longer than leak_threshold"
AFTER_RESPONSE = "still checked out after the response finished"

_SUSPECTS_KEPT = 10
_WAIT_WINDOW = 60.0  # seconds of acquire waits that snapshot() summarises


@dataclass(frozen=True, slots=True)
class LeakSuspect:
    """A connection that looks leaked: held too long, or outliving its request."""

    pool: str
    """The watcher's name (a label, never a DSN)."""
    route: str
    """Route template the connection was checked out for, or ``"<no request>"``."""
    held_seconds: float
    """How long it had been checked out when reported."""
    where: str
    """The few innermost frames of the code that checked it out, on one line."""
    reason: str
    """``"held longer than leak_threshold"`` or
    ``"still checked out after the response finished"``."""

    def as_dict(self) -> dict[str, Any]:
        """The suspect as plain data (what :meth:`PoolWatcher.snapshot` lists)."""
        return asdict(self)

    def describe(self) -> str:
        """One line for the log: which pool, how long, which route, where it was taken."""
        return (
            f"leak suspect in pool {self.pool}: connection {self.reason} "
            f"({self.held_seconds:.1f} s) for route {self.route}, taken at {self.where}"
        )


class PoolSink(Protocol):
    """Where a :class:`PoolWatcher` reports what needs action (the guard is one).

    Both methods are called on the thread (and in the context) where the event
    happened: keep them quick and never let them block.
    """

    def pool_timeout(self, watcher: PoolWatcher, exc: BaseException) -> None:
        """An acquire gave up because the pool had no connection to give (``exc``)."""

    def leak_suspect(self, watcher: PoolWatcher, info: LeakSuspect) -> None:
        """A connection looks leaked (already logged by the watcher)."""


class Adapter(Protocol):
    """The driver-specific part of a watcher: hooks in, reads stats, unhooks."""

    kind: str

    def stats(self) -> dict[str, Any]:
        """``size`` and ``waiting`` (``None`` when unknown) plus driver extras."""
        ...

    def detach(self) -> None:
        """Remove every listener and wrapper installed on the pool."""
        ...


class _Checkout:
    """One connection checked out and not yet returned."""

    __slots__ = ("context", "frames", "key", "reported", "route", "started", "watcher")

    def __init__(
        self,
        watcher: PoolWatcher,
        key: int,
        started: float,
        call: context.CallContext | None,
        frames: Frames,
    ) -> None:
        self.watcher = watcher
        self.key = key
        self.started = started
        self.context = call
        self.route = call.route if call is not None else NO_REQUEST
        self.frames = frames
        self.reported = False


class Acquiring:
    """One acquire being timed; see :meth:`PoolWatcher.acquiring`."""

    __slots__ = ("started", "timeouts", "watcher")

    def __init__(
        self,
        watcher: PoolWatcher,
        timeouts: type[BaseException] | tuple[type[BaseException], ...],
    ) -> None:
        self.watcher = watcher
        self.timeouts = timeouts
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = self.watcher.acquire_started()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        timeout = exc is not None and isinstance(exc, self.timeouts)
        self.watcher.acquire_done(self.started, exc, timeout=timeout)


class PoolWatcher:
    """Watches one pool: checked-out count, acquire waits, pool timeouts, leak suspects.

    Made by :func:`guardrails.pools.watch`; read it with :meth:`snapshot`, stop it with
    :meth:`close`. Safe to use from several threads (sync pools) and from the event loop.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        *,
        sink: PoolSink | None,
        leak_threshold: float | None,
    ) -> None:
        self.kind = kind
        """``"sqlalchemy"``, ``"asyncpg"`` or ``"psycopg"``."""
        self.name = name
        """The label snapshots and logs show (never a DSN)."""
        self.leak_threshold = leak_threshold
        """Seconds a connection may stay checked out before it is a suspect; None: off."""
        self.sink = sink
        self.closed = False
        self._adapter: Adapter | None = None
        self._lock = threading.Lock()
        self._held: dict[int, _Checkout] = {}  # in checkout order, oldest first
        self._acquiring = 0
        self._waits = Histogram()  # buckets for Prometheus + a ring of recent waits
        self.acquires_total = 0
        self.timeouts_total = 0
        self.leak_suspects_total = 0
        self._suspects: deque[LeakSuspect] = deque(maxlen=_SUSPECTS_KEPT)
        self.counters: dict[str, int] = {}
        """Driver-specific event counters (connects, closes, invalidations...)."""
        self.fault: AcquireFault | None = None
        """What a test makes each acquire do (:mod:`guardrails.testing` sets it); adapters
        consult it inside :meth:`acquiring`. None: nothing, at the cost of one read."""

    def attach(self, adapter: Adapter) -> None:
        """Read pool statistics from ``adapter`` and detach it on :meth:`close`; adapters
        call it once, when they start watching."""
        self._adapter = adapter

    @property
    def waiting(self) -> int:
        """Acquires under way right now (callers waiting for a connection)."""
        return self._acquiring

    # -- what adapters call --------------------------------------------------------------

    def acquiring(
        self, timeouts: type[BaseException] | tuple[type[BaseException], ...]
    ) -> Acquiring:
        """Time one acquire: ``with watcher.acquiring(PoolTimeout): conn = get()``.

        An exception of a ``timeouts`` type is the pool giving up (counted, sent to the
        sink); any other leaves only the waiting count. Works around ``await`` too.
        """
        return Acquiring(self, timeouts)

    def acquire_started(self) -> float:
        """An acquire begins; returns its start time for :meth:`acquire_done`."""
        with self._lock:
            self._acquiring += 1
        return time.monotonic()

    def acquire_done(self, started: float, exc: BaseException | None, *, timeout: bool) -> None:
        """An acquire that began at ``started`` ended; ``timeout``: the pool gave up.

        Cancelled or otherwise failed acquires (``exc`` set, ``timeout`` False) only
        leave the waiting count. Pool timeouts are counted, their wait recorded, and
        sent to the sink.
        """
        now = time.monotonic()
        with self._lock:
            self._acquiring -= 1
            if self.closed or (exc is not None and not timeout):
                return
            self._waits.observe(now - started, now)
            if exc is None:
                return
            self.timeouts_total += 1
        sink = self.sink
        if sink is not None and exc is not None:
            try:
                sink.pool_timeout(self, exc)
            except Exception:
                logger.exception("pool sink failed on a pool timeout of %s", self.name)

    def checked_out(self, key: int) -> None:
        """Connection ``key`` was handed to the application, in the caller's context."""
        call = context.current()
        frames = capture_stack(skip=2) if self.leak_threshold is not None or call else ()
        now = time.monotonic()
        with self._lock:
            if self.closed:
                return
            record = _Checkout(self, key, now, call, frames)
            self.acquires_total += 1
            self._held[key] = record
            suspects = self._overdue(now)
        if call is not None:
            call.checkouts[id(record)] = record
            call.outcome.reached_database()
        if suspects:
            self._report(suspects)

    def checked_in(self, key: int) -> None:
        """Connection ``key`` went back to the pool (or left it for good)."""
        now = time.monotonic()
        with self._lock:
            record = self._held.pop(key, None)
            if record is None:
                return
            suspects = self._overdue(now)
            threshold = self.leak_threshold
            if threshold is not None and not record.reported and now - record.started > threshold:
                # Returned in the end, but held past the threshold: still worth a report.
                record.reported = True
                suspects.append(self._suspect(record, now, OVER_THRESHOLD))
        call = record.context
        if call is not None:
            call.checkouts.pop(id(record), None)
        if suspects:
            self._report(suspects)

    def count(self, event: str) -> None:
        """Add one to the driver counter ``event`` (``"connects_total"``...)."""
        with self._lock:
            self.counters[event] = self.counters.get(event, 0) + 1

    # -- leak detection ------------------------------------------------------------------

    def _overdue(self, now: float) -> list[LeakSuspect]:
        # Called with the lock held. Oldest first, so the walk stops at the first
        # connection still under the threshold: O(1) unless connections are overdue.
        threshold = self.leak_threshold
        found: list[LeakSuspect] = []
        if threshold is None:
            return found
        for record in self._held.values():
            if now - record.started <= threshold:
                break
            if not record.reported:
                record.reported = True
                found.append(self._suspect(record, now, OVER_THRESHOLD))
        return found

    def _suspect(self, record: _Checkout, now: float, reason: str) -> LeakSuspect:
        suspect = LeakSuspect(
            pool=self.name,
            route=record.route,
            held_seconds=round(now - record.started, 3),
            where=format_stack(record.frames),
            reason=reason,
        )
        self.leak_suspects_total += 1
        self._suspects.append(suspect)
        return suspect

    def _report(self, suspects: list[LeakSuspect]) -> None:
        for suspect in suspects:
            sink = self.sink
            if sink is None:
                logger.warning(
                    "%s",
                    suspect.describe(),
                    extra={"guardrails_event": "leak_suspect", **suspect.as_dict()},
                )
                continue
            # The guard's telemetry logs it (rate-limited per route) and tells its sinks.
            try:
                sink.leak_suspect(self, suspect)
            except Exception:
                logger.exception("pool sink failed on a leak suspect of %s", self.name)

    def _unreturned(self, record: _Checkout) -> None:
        now = time.monotonic()
        with self._lock:
            record.context = None
            if record.reported or self._held.get(record.key) is not record:
                return
            record.reported = True
            suspect = self._suspect(record, now, AFTER_RESPONSE)
        self._report([suspect])

    # -- public --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The pool's state as plain data (no DSN, host or user, ever).

        Also the moment connections over ``leak_threshold`` are noticed when the pool is
        idle otherwise (the guard takes a snapshot every second).
        """
        now = time.monotonic()
        stats = self._adapter.stats() if self._adapter is not None and not self.closed else {}
        with self._lock:
            suspects = self._overdue(now)
            waits = sorted(self._waits.recent(_WAIT_WINDOW, now))
            histogram = {
                "buckets": self._waits.cumulative(),
                "sum": self._waits.sum,
                "count": self._waits.count,
            }
            data: dict[str, Any] = {
                "kind": self.kind,
                "name": self.name,
                "size": stats.pop("size", None),
                "checked_out": len(self._held),
                "waiting": stats.pop("waiting", None),
                "acquires_total": self.acquires_total,
                "acquire_wait_samples": len(waits),
                "acquire_wait_p50_seconds": percentile(waits, 0.5) if waits else None,
                "acquire_wait_p95_seconds": percentile(waits, 0.95) if waits else None,
                "acquire_wait_max_seconds": waits[-1] if waits else None,
                "acquire_wait_histogram": histogram,
                "timeouts_total": self.timeouts_total,
                "leak_threshold": self.leak_threshold,
                "leak_suspects_total": self.leak_suspects_total,
                "leak_suspects": [s.as_dict() for s in self._suspects],
                "closed": self.closed,
                **self.counters,
                **stats,
            }
        if suspects:
            self._report(suspects)
        return data

    def close(self) -> None:
        """Stop watching: remove every listener and wrapper; the counts stay readable."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            held, self._held = list(self._held.values()), {}
        for record in held:
            if record.context is not None:
                record.context.checkouts.pop(id(record), None)
        if self._adapter is not None:
            self._adapter.detach()

    def __repr__(self) -> str:
        return f"<PoolWatcher {self.kind} {self.name!r}{' closed' if self.closed else ''}>"


def request_finished(ctx: context.CallContext) -> None:
    """Report every connection still checked out for ``ctx`` as a leak suspect.

    The middleware calls it once the app has returned and the response is finished;
    a connection the request took and did not give back by then is leaking (or was
    handed to a background task, which is worth knowing too).
    """
    checkouts = ctx.checkouts
    for key, record in list(checkouts.items()):
        if isinstance(record, _Checkout):
            checkouts.pop(key, None)
            record.watcher._unreturned(record)


def checked_name(name: object, default: Callable[[], str]) -> str:
    """The watcher's label: ``name`` if given (and not a URL), else ``default()``."""
    if name is None:
        return default()
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str label such as 'primary', not {name!r}")
    if "://" in name or "@" in name:
        raise ValueError(
            "name is shown in snapshots and logs and must not be a connection URL; "
            "pass a plain label such as 'primary'"
        )
    return name


def checked_threshold(leak_threshold: object) -> float | None:
    """Validate ``leak_threshold``: positive seconds, or None to turn the check off."""
    if leak_threshold is None:
        return None
    if (
        isinstance(leak_threshold, bool)
        or not isinstance(leak_threshold, int | float)
        or not leak_threshold > 0
    ):
        raise ValueError(
            f"leak_threshold must be a positive number of seconds or None (off), "
            f"not {leak_threshold!r}"
        )
    return float(leak_threshold)
