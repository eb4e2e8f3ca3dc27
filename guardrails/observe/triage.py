"""Early warnings and triage: which pool trouble is this, and is it coming?

The guard samples its own counters once a second (:class:`Sample`). From the recent
samples this module says, in words and numbers:

- **early warnings**, raised before errors start: queue wait p95 or pool acquire p95
  above a threshold, utilisation at or above 80% for a sustained window, the retry
  budget spent;
- **triage** of current trouble into one of

  ``exhaustion``  demand or slow queries exceed the pool: slots and connections are
                  busy with in-flight requests, requests queue or time out; it tracks
                  traffic and recovers when traffic falls;
  ``leak``        connections stay checked out with no request holding them: the
                  checked-out count grows (or stays up) while traffic does not; it
                  does not recover until the process restarts;
  ``storm``       the database itself refuses connections (``too many clients``,
                  SQLSTATE 53300) or connections are opened far faster than the pool
                  could need: many pools multiplied by instances;
  ``none``        nothing of the above.

Everything here is a pure function of the samples, so it is tested on recorded
series as well as on live ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guardrails.observe.stats import rank

__all__ = [
    "Diagnosis",
    "EarlyWarning",
    "Sample",
    "Warning_",
    "diagnose",
    "early_warnings",
    "refused_as_too_many",
]

_TOO_MANY_SQLSTATES = frozenset({"53300"})


def refused_as_too_many(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is the database refusing a connection as too many.

    By SQLSTATE 53300 (asyncpg's ``TooManyConnectionsError``, SQLAlchemy's errors that
    wrap it), never by message text. libpq reports a refused connection attempt without
    a SQLSTATE, so psycopg's count as outages (:func:`guardrails.errors.classify`) but
    are not told apart here.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        sqlstate = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if sqlstate in _TOO_MANY_SQLSTATES:
            return True
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException):
            todo.append(orig)
        if current.__cause__ is not None:
            todo.append(current.__cause__)
    return False


@dataclass(frozen=True, slots=True)
class Sample:
    """The guard's counters at one moment (cumulative ``*_total`` counters only grow)."""

    at: float
    """Monotonic seconds."""
    arrivals_total: int
    """Requests that asked for a slot (admitted or shed)."""
    admitted_total: int
    in_flight: int
    limit: int
    queued: int
    checked_out: int | None
    """Connections checked out of the watched pools, or None without a watcher."""
    pool_size: int | None
    pool_timeouts_total: int
    connects_total: int
    """New database connections opened by the watched pools."""
    leak_suspects_total: int
    refused_total: int
    """Connections the database refused as too many (SQLSTATE 53300 and kin)."""
    retry_remaining: int


@dataclass(frozen=True, slots=True)
class EarlyWarning:
    """Thresholds of the early warnings (``Guardrails(early_warning=...)``).

    ``queue_wait_p95`` defaults to half the limiter's ``queue_timeout``;
    ``acquire_wait_p95`` to 100 ms; ``utilization`` to 0.8 held for ``sustained``
    seconds (30). Each is checked over the last ``window`` seconds (30); the triage
    looks at the last ``triage_window`` seconds (60).
    """

    queue_wait_p95: float | None = None
    acquire_wait_p95: float = 0.1
    utilization: float = 0.8
    sustained: float = 30.0
    window: float = 30.0
    triage_window: float = 60.0
    """Seconds of samples the triage looks at."""

    def __post_init__(self) -> None:
        for name in ("acquire_wait_p95", "sustained", "window", "triage_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.queue_wait_p95 is not None and not self.queue_wait_p95 > 0:
            raise ValueError(f"queue_wait_p95 must be > 0 seconds, not {self.queue_wait_p95!r}")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"utilization must be above 0 and at most 1, not {self.utilization!r}")


@dataclass(frozen=True, slots=True)
class Warning_:
    """One early warning: what, how much, against which threshold."""

    check: str
    observed: float
    threshold: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "observed": self.observed,
            "threshold": self.threshold,
            "text": self.text,
        }


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The triage verdict with its evidence."""

    kind: str
    """``"exhaustion"``, ``"leak"``, ``"storm"`` or ``"none"``."""
    evidence: str
    numbers: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "evidence": self.evidence, "numbers": dict(self.numbers)}


NONE = Diagnosis("none", "no sign of pool trouble", {})


def _window(samples: Sequence[Sample], seconds: float) -> list[Sample]:
    if not samples:
        return []
    cutoff = samples[-1].at - seconds
    return [s for s in samples if s.at >= cutoff]


def _rate(first: Sample, last: Sample, field: str) -> float:
    elapsed = last.at - first.at
    if elapsed <= 0:
        return 0.0
    return float(getattr(last, field) - getattr(first, field)) / elapsed


def queue_wait_p95(window: Sequence[Sample], recent_waits: Sequence[float]) -> float | None:
    """p95 of the queue wait over every request admitted in ``window``.

    Requests admitted at once waited 0 s and are not in ``recent_waits`` (the waits
    of those that queued, in the same window); they are counted here as zeros.
    """
    if len(window) < 2:
        return None
    admitted = window[-1].admitted_total - window[0].admitted_total
    if admitted <= 0:
        return None
    waits = sorted(recent_waits)
    zeros = max(0, admitted - len(waits))
    # Nearest rank over the zeros and the waits together, without a list of the zeros.
    at = rank(zeros + len(waits), 0.95)
    if at <= zeros:
        return 0.0
    return waits[min(len(waits) - 1, at - zeros - 1)]


def early_warnings(
    samples: Sequence[Sample],
    settings: EarlyWarning,
    *,
    queue_timeout: float,
    recent_queue_waits: Sequence[float],
    acquire_p95: float | None,
) -> list[Warning_]:
    """The early warnings that hold now."""
    found: list[Warning_] = []
    window = _window(samples, settings.window)
    limit_wait = settings.queue_wait_p95 or queue_timeout / 2
    p95 = queue_wait_p95(window, recent_queue_waits)
    if p95 is not None and limit_wait > 0 and p95 > limit_wait:
        found.append(
            Warning_(
                "queue_wait_p95",
                round(p95, 4),
                limit_wait,
                f"requests wait {p95 * 1000:.0f} ms for a slot at p95 "
                f"(warning above {limit_wait * 1000:.0f} ms)",
            )
        )
    if acquire_p95 is not None and acquire_p95 > settings.acquire_wait_p95:
        found.append(
            Warning_(
                "acquire_wait_p95",
                round(acquire_p95, 4),
                settings.acquire_wait_p95,
                f"pool acquire p95 is {acquire_p95 * 1000:.0f} ms "
                f"(warning above {settings.acquire_wait_p95 * 1000:.0f} ms)",
            )
        )
    held = _window(samples, settings.sustained)
    # Only once the samples reach back a whole window can it have been sustained.
    if held and samples[-1].at - samples[0].at >= settings.sustained * 0.9:
        lowest = min(s.in_flight / s.limit for s in held if s.limit)
        if lowest >= settings.utilization:
            found.append(
                Warning_(
                    "utilization",
                    round(lowest, 3),
                    settings.utilization,
                    f"at least {lowest:.0%} of the slots busy for the last "
                    f"{settings.sustained:.0f} s (warning at {settings.utilization:.0%})",
                )
            )
    if samples and samples[-1].retry_remaining == 0:
        found.append(
            Warning_("retry_budget", 0, 0, "the retry budget is spent: reads are not retried")
        )
    return found


def diagnose(samples: Sequence[Sample], window: float = 60.0) -> Diagnosis:
    """Classify the trouble shown by the samples of the last ``window`` seconds."""
    recent = _window(samples, window)
    if len(recent) < 3:
        return NONE
    first, last = recent[0], recent[-1]
    span = last.at - first.at
    if span <= 0:
        return NONE
    refused = last.refused_total - first.refused_total
    connects = last.connects_total - first.connects_total
    size = last.pool_size or last.limit
    if refused > 0 or (size and connects >= 4 * size and connects / span >= 1):
        return Diagnosis(
            "storm",
            f"the database refused {refused} connection(s) as too many and "
            f"{connects} new connections were opened in {span:.0f} s "
            f"(the pool holds {size}): connections multiply across processes or "
            "instances; cap instances, shrink per-instance pools, or put a pooler in front",
            {
                "refused": refused,
                "connects": connects,
                "connects_per_second": round(connects / span, 2),
                "pool_size": size,
            },
        )
    suspects = last.leak_suspects_total - first.leak_suspects_total
    if last.checked_out is not None and first.checked_out is not None:
        unheld = last.checked_out - last.in_flight
        grew = last.checked_out - first.checked_out
        half = recent[len(recent) // 2]
        early_rate = _rate(first, half, "arrivals_total")
        late_rate = _rate(half, last, "arrivals_total")
        steady = late_rate <= early_rate * 1.2 + 1
        never_fell = all(
            b.checked_out is not None
            and a.checked_out is not None
            and b.checked_out >= a.checked_out
            for a, b in itertools.pairwise(recent)
        )
        if suspects > 0 or (unheld >= max(1, size // 5) and grew >= 2 and never_fell and steady):
            return Diagnosis(
                "leak",
                f"{last.checked_out} connection(s) checked out while only "
                f"{last.in_flight} request(s) are in flight; checked-out went from "
                f"{first.checked_out} to {last.checked_out} in {span:.0f} s while traffic "
                f"stayed at {late_rate:.1f} req/s; {suspects} leak suspect(s) reported: "
                "a code path keeps connections (see the leak suspects' stacks)",
                {
                    "checked_out": last.checked_out,
                    "in_flight": last.in_flight,
                    "checked_out_growth": grew,
                    "arrivals_per_second": round(late_rate, 2),
                    "leak_suspects": suspects,
                },
            )
    timeouts = last.pool_timeouts_total - first.pool_timeouts_total
    shed = (last.arrivals_total - last.admitted_total) - (
        first.arrivals_total - first.admitted_total
    )
    busy = sum(1 for s in recent if s.limit and s.in_flight >= s.limit) / len(recent)
    if timeouts > 0 or shed > 0 or busy >= 0.5:
        rate = _rate(first, last, "arrivals_total")
        return Diagnosis(
            "exhaustion",
            f"all {last.limit} slots busy in {busy:.0%} of the last {span:.0f} s, "
            f"{shed} request(s) shed, {timeouts} pool timeout(s), at {rate:.1f} req/s: "
            "demand or slow queries exceed the pool; it should recover as traffic falls "
            "(speed up the slow queries, or raise the budget if the database has room)",
            {
                "busy_fraction": round(busy, 3),
                "shed": shed,
                "pool_timeouts": timeouts,
                "arrivals_per_second": round(rate, 2),
            },
        )
    return NONE
