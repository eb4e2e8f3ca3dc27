"""Turns one run's request outcomes into the numbers the demo reports (``RunStats``).

Pure data in, data out: no I/O, so the test and the report read the very same figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardrails.observe.stats import percentile
from guardrails.tools.demo.load import Outcome

__all__ = ["RunStats", "percentile", "summarize"]


@dataclass(frozen=True)
class RunStats:
    """The figures of one run (one variant of the app under the same load)."""

    label: str
    guarded: bool
    pool_timeout: float
    sent: int
    ok: int
    """2xx responses."""
    shed: int
    """503 responses."""
    server_errors: int
    """500 responses."""
    other: int
    """Any other status, plus requests that got no response at all."""
    timeouts: int
    """Requests that got no response within the client's timeout (part of ``other``)."""
    wall: float
    """Seconds from the first scheduled send to the last response."""
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    """The longest any request waited, from its scheduled send to its answer."""
    ok_p50_ms: float | None
    ok_p99_ms: float | None
    shed_p50_ms: float | None
    shed_p99_ms: float | None
    error_p50_ms: float | None
    """Median latency of the 500s: how long those users waited to be told it failed."""
    retry_after: tuple[int, ...]
    """Distinct ``Retry-After`` values the 503s carried."""
    shed_malformed: int
    """503s without an integer Retry-After or without the ``overloaded`` JSON body."""
    max_lag_ms: float
    """How late the client ever was in sending: near 0 means the load was truly open-loop."""
    pool_timeouts: int | None
    """SQLAlchemy pool TimeoutErrors in the server's log."""
    limiter_shed_total: int | None
    """``guard.snapshot()["limiter"]["shed_total"]`` after the run (guarded run only)."""
    limiter_in_flight: int | None
    """``guard.snapshot()["limiter"]["in_flight"]`` after the run: 0 unless a slot leaked."""
    limiter_queued: int | None
    shed_by_reason: Mapping[str, int]
    """The limiter's count of sheds per reason (``queue_timeout``, ``queue_full``...)."""
    stale: int = 0
    """2xx answers replayed from the cache, marked ``X-Guardrails: stale`` (part of ``ok``)."""
    shed_by_error: Mapping[str, int] = field(default_factory=dict)
    """503s by the ``error`` of their body: ``overloaded``, ``unavailable``, ``read_only``..."""
    login_p99_ms: float | None = None
    """p99 latency of ``POST /login``, whatever its answer: can people still sign in?"""
    breaker_transitions: Mapping[str, int] | None = None
    """Breaker transitions by the state entered, from the guard's telemetry (guarded run)."""
    stale_served: int | None = None
    """Stale answers the guard counted itself (guarded run); should equal ``stale``."""
    job_runs: int | None = None
    """Rounds the app's background job started during the run."""
    job_ok: int | None = None
    """Rounds of the background job that finished."""
    job_failed: int | None = None
    """Rounds of the background job that failed (pool timeout, shed, unavailable...)."""
    job_max_ms: float | None = None
    """The background job's longest round."""
    duration: float = 0.0
    """Seconds of scheduled load (the load's ``--duration``)."""
    stale_p99_ms: float | None = None
    fresh_p50_ms: float | None = None
    fresh_p99_ms: float | None = None

    @property
    def goodput(self) -> float:
        """2xx responses per second of the run, stale ones included."""
        return self.ok / self.wall if self.wall > 0 else 0.0

    @property
    def fresh(self) -> int:
        """2xx responses the app computed for this request (not replayed from the cache)."""
        return self.ok - self.stale

    @property
    def fresh_goodput(self) -> float:
        """Fresh 2xx responses per second of the run."""
        return self.fresh / self.wall if self.wall > 0 else 0.0

    @property
    def breaker_opened(self) -> int | None:
        """How many times the breaker opened (guarded run)."""
        if self.breaker_transitions is None:
            return None
        return int(self.breaker_transitions.get("open", 0))


def _ms(values: list[float], fraction: float) -> float | None:
    return percentile(values, fraction) * 1000 if values else None


def summarize(
    label: str,
    outcomes: Sequence[Outcome],
    *,
    guarded: bool,
    pool_timeout: float,
    pool_timeouts: int | None = None,
    snapshot: Mapping[str, Any] | None = None,
    job: Mapping[str, Any] | None = None,
    duration: float = 0.0,
) -> RunStats:
    """The figures of a run from its outcomes and the app's own counters.

    ``snapshot`` is the guard's ``snapshot()`` after the run (guarded run), ``job`` the
    background job's counters from ``GET /demo/stats``.
    """
    latencies = sorted(o.latency for o in outcomes)
    by_class: dict[str, list[Outcome]] = {"ok": [], "shed": [], "error": [], "other": []}
    for outcome in outcomes:
        status = outcome.status
        if status is not None and 200 <= status < 300:
            by_class["ok"].append(outcome)
        elif status == 503:
            by_class["shed"].append(outcome)
        elif status == 500:
            by_class["error"].append(outcome)
        else:
            by_class["other"].append(outcome)
    shed = by_class["shed"]
    limiter = snapshot.get("limiter") if snapshot is not None else None
    if not isinstance(limiter, Mapping):
        limiter = {}
    telemetry = snapshot.get("telemetry") if snapshot is not None else None
    if not isinstance(telemetry, Mapping):
        telemetry = {}
    wall = max((o.arrival.at + o.latency for o in outcomes), default=0.0)
    return RunStats(
        label=label,
        guarded=guarded,
        pool_timeout=pool_timeout,
        sent=len(outcomes),
        ok=len(by_class["ok"]),
        shed=len(shed),
        server_errors=len(by_class["error"]),
        other=len(by_class["other"]),
        timeouts=sum(1 for o in by_class["other"] if o.error is not None and "Timeout" in o.error),
        wall=wall,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p95_ms=percentile(latencies, 0.95) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=(latencies[-1] if latencies else math.nan) * 1000,
        ok_p50_ms=_ms([o.latency for o in by_class["ok"]], 0.50),
        ok_p99_ms=_ms([o.latency for o in by_class["ok"]], 0.99),
        shed_p50_ms=_ms([o.latency for o in shed], 0.50),
        shed_p99_ms=_ms([o.latency for o in shed], 0.99),
        error_p50_ms=_ms([o.latency for o in by_class["error"]], 0.50),
        retry_after=tuple(sorted({o.retry_after for o in shed if o.retry_after is not None})),
        shed_malformed=sum(1 for o in shed if not o.shed_body),
        max_lag_ms=max((o.lag for o in outcomes), default=0.0) * 1000,
        pool_timeouts=pool_timeouts,
        limiter_shed_total=_int_or_none(limiter.get("shed_total")),
        limiter_in_flight=_int_or_none(limiter.get("in_flight")),
        limiter_queued=_int_or_none(limiter.get("queued")),
        shed_by_reason=_reasons(limiter.get("shed_by_reason")),
        stale=sum(1 for o in by_class["ok"] if o.stale),
        shed_by_error=_count_by(o.reason or "other" for o in shed),
        login_p99_ms=_ms([o.latency for o in outcomes if o.arrival.route == "/login"], 0.99),
        breaker_transitions=_reasons(telemetry.get("breaker_transitions")) if guarded else None,
        stale_served=_stale_served(telemetry) if guarded else None,
        job_runs=_int_or_none(job.get("runs")) if job is not None else None,
        job_ok=_int_or_none(job.get("ok")) if job is not None else None,
        job_failed=_failed(job.get("failed")) if job is not None else None,
        job_max_ms=_float_or_none(job.get("max_ms")) if job is not None else None,
        duration=duration,
        stale_p99_ms=_ms([o.latency for o in by_class["ok"] if o.stale], 0.99),
        fresh_p50_ms=_ms([o.latency for o in by_class["ok"] if not o.stale], 0.50),
        fresh_p99_ms=_ms([o.latency for o in by_class["ok"] if not o.stale], 0.99),
    )


def _reasons(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items() if _int_or_none(v) is not None}


def _count_by(keys: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return counts


def _stale_served(telemetry: Mapping[str, Any]) -> int:
    fallbacks = telemetry.get("fallbacks")
    if not isinstance(fallbacks, list):
        return 0
    return sum(
        int(f.get("count", 0))
        for f in fallbacks
        if isinstance(f, Mapping) and f.get("kind") == "stale"
    )


def _failed(value: Any) -> int | None:
    if not isinstance(value, Mapping):
        return None
    return sum(n for n in map(_int_or_none, value.values()) if n is not None)


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
