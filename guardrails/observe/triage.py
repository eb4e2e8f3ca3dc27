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
  ``outage``      the circuit breaker opened: the database failed (connections
                  refused or dropped, pool timeouts) and requests were answered 503
                  at once; it ends when the database answers again;
  ``slowdown``    the adaptive limit came down because slots are held longer than the
                  database's baseline: the database serves this much concurrency worse
                  than usual (CPU, I/O, locks); the limit climbs back as it recovers;
  ``bulkhead``    only routes with their own ``max_concurrency`` shed: their sub-limit
                  was full while the global slots had room; the pool is fine;
  ``none``        nothing of the above.

Everything here is a pure function of the samples, so it is tested on recorded
series as well as on live ones.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guardrails.observe.early_warning import EarlyWarning, Warning_, early_warnings, queue_wait_p95
from guardrails.observe.sample import BulkheadSample, Sample, last_seconds, rate_of

__all__ = [
    "NONE",
    "BulkheadSample",
    "Diagnosis",
    "EarlyWarning",
    "Sample",
    "Warning_",
    "diagnose",
    "early_warnings",
    "queue_wait_p95",
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
class Diagnosis:
    """The triage verdict with its evidence."""

    kind: str
    """``"exhaustion"``, ``"leak"``, ``"storm"``, ``"outage"``, ``"slowdown"``,
    ``"bulkhead"`` or ``"none"``."""
    evidence: str
    numbers: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "evidence": self.evidence, "numbers": dict(self.numbers)}


NONE = Diagnosis("none", "no sign of pool trouble", {})


def diagnose(samples: Sequence[Sample], window: float = 60.0) -> Diagnosis:
    """Classify the trouble shown by the samples of the last ``window`` seconds."""
    recent = last_seconds(samples, window)
    if len(recent) < 3 or recent[-1].at - recent[0].at <= 0:
        return NONE
    return (
        _storm(recent)
        or _leak(recent)
        or _outage(recent)
        or _slowdown(recent)
        or _exhaustion(recent)
        or _bulkhead(recent)
        or NONE
    )


def _storm(recent: list[Sample]) -> Diagnosis | None:
    first, last = recent[0], recent[-1]
    span = last.at - first.at
    refused = last.refused_total - first.refused_total
    connects = last.connects_total - first.connects_total
    size = last.pool_size or last.limit
    if not (refused > 0 or (size and connects >= 4 * size and connects / span >= 1)):
        return None
    return Diagnosis(
        "storm",
        f"the database refused {refused} connection(s) as too many and "
        f"{connects} new connections were opened in {round(span, 1):g} s "
        f"(the pool holds {size}): connections multiply across processes or "
        "instances; cap instances, shrink per-instance pools, or put a pooler in front",
        {
            "refused": refused,
            "connects": connects,
            "connects_per_second": round(connects / span, 2),
            "pool_size": size,
        },
    )


def _leak(recent: list[Sample]) -> Diagnosis | None:
    first, last = recent[0], recent[-1]
    if last.checked_out is None or first.checked_out is None:
        return None
    span = last.at - first.at
    size = last.pool_size or last.limit
    suspects = last.leak_suspects_total - first.leak_suspects_total
    unheld = last.checked_out - last.in_flight
    grew = last.checked_out - first.checked_out
    half = recent[len(recent) // 2]
    early_rate = rate_of(first, half, "arrivals_total")
    late_rate = rate_of(half, last, "arrivals_total")
    steady = late_rate <= early_rate * 1.2 + 1
    never_fell = all(
        b.checked_out is not None and a.checked_out is not None and b.checked_out >= a.checked_out
        for a, b in itertools.pairwise(recent)
    )
    if not (suspects > 0 or (unheld >= max(1, size // 5) and grew >= 2 and never_fell and steady)):
        return None
    return Diagnosis(
        "leak",
        f"{last.checked_out} connection(s) checked out while only "
        f"{last.in_flight} request(s) are in flight; checked-out went from "
        f"{first.checked_out} to {last.checked_out} in {round(span, 1):g} s while traffic "
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


def _outage(recent: list[Sample]) -> Diagnosis | None:
    first, last = recent[0], recent[-1]
    span = last.at - first.at
    refused = last.outage_refused_total - first.outage_refused_total
    not_closed = sum(1 for s in recent if s.breaker != "closed") / len(recent)
    if refused <= 0 and not not_closed:
        return None
    timeouts = last.pool_timeouts_total - first.pool_timeouts_total
    # The first opening in the window: later ones are mostly failed recovery probes.
    opened_by = next((s.opened_by for s in recent if s.opened_by), None)
    cause = f"; it opened on {opened_by}" if opened_by else ""
    if timeouts > 0:
        advice = (
            "the pool could not hand out connections in time: slow queries, a leak, or a "
            "database that stopped answering"
        )
    else:
        advice = (
            "the database is down, restarting or unreachable (connections refused or "
            "dropped), not short of connections: look at the database; meanwhile requests "
            "are answered at once, and the breaker closes when it answers again"
        )
    return Diagnosis(
        "outage",
        f"the circuit breaker was open or half-open in {not_closed:.0%} of the last "
        f"{round(span, 1):g} s (now {last.breaker.replace('_', '-')}) and {refused} request(s) "
        f"were refused with 503 because the database was down{cause}; "
        f"{timeouts} pool timeout(s): {advice}",
        {
            "refused": refused,
            "open_fraction": round(not_closed, 3),
            "pool_timeouts": timeouts,
        },
    )


def _slowdown(recent: list[Sample]) -> Diagnosis | None:
    first, last = recent[0], recent[-1]
    ceiling = last.ceiling
    if ceiling is None or last.limit >= ceiling or last.baseline is None:
        return None
    lowered = [s for s in recent if s.ceiling is not None and s.limit < s.ceiling]
    if len(lowered) * 2 < len(recent):
        return None  # lowered for a moment only: not the story of this window
    span = last.at - first.at
    lowest = min(s.limit for s in lowered)
    shed = (last.arrivals_total - last.admitted_total) - (
        first.arrivals_total - first.admitted_total
    )
    hold = last.hold
    held = f"{hold * 1000:.0f} ms" if hold is not None else "longer"
    numbers: dict[str, float] = {
        "limit": last.limit,
        "ceiling": ceiling,
        "lowest_limit": lowest,
        "baseline_seconds": last.baseline,
        "shed": shed,
    }
    if hold is not None:
        numbers["hold_seconds"] = hold
    return Diagnosis(
        "slowdown",
        f"the database is slower than its baseline (slots held {held} against "
        f"{last.baseline * 1000:.0f} ms): limit lowered from {ceiling} to {last.limit} "
        f"(lowest {lowest}) in the last {round(span, 1):g} s, {shed} request(s) shed; "
        "more concurrency would add latency, not throughput: look for CPU, I/O or lock "
        "contention in the database; the limit climbs back as it recovers",
        numbers,
    )


def _bulkhead_sheds(first: Sample, last: Sample) -> dict[str, int]:
    before = {b.name: b.shed_total for b in first.bulkheads}
    sheds = {b.name: b.shed_total - before.get(b.name, 0) for b in last.bulkheads}
    return {name: count for name, count in sheds.items() if count > 0}


def _busy(recent: list[Sample]) -> float:
    return sum(1 for s in recent if s.limit and s.in_flight >= s.limit) / len(recent)


def _exhaustion(recent: list[Sample]) -> Diagnosis | None:
    first, last = recent[0], recent[-1]
    span = last.at - first.at
    timeouts = last.pool_timeouts_total - first.pool_timeouts_total
    by_bulkheads = sum(_bulkhead_sheds(first, last).values())
    shed = (last.arrivals_total - last.admitted_total) - (
        first.arrivals_total - first.admitted_total
    )
    shed -= by_bulkheads  # the routes' own max_concurrency, not the global slots
    busy = _busy(recent)
    if not (timeouts > 0 or shed > 0 or busy >= 0.5):
        return None
    rate = rate_of(first, last, "arrivals_total")
    also = f" (and {by_bulkheads} by routes' own max_concurrency)" if by_bulkheads else ""
    return Diagnosis(
        "exhaustion",
        f"all {last.limit} slots busy in {busy:.0%} of the last {round(span, 1):g} s, "
        f"{shed} request(s) shed{also}, {timeouts} pool timeout(s), at {rate:.1f} req/s: "
        "demand or slow queries exceed the pool; it should recover as traffic falls "
        "(speed up the slow queries, or raise the budget if the database has room)",
        {
            "busy_fraction": round(busy, 3),
            "shed": shed,
            "bulkhead_shed": by_bulkheads,
            "pool_timeouts": timeouts,
            "arrivals_per_second": round(rate, 2),
        },
    )


def _bulkhead(recent: list[Sample]) -> Diagnosis | None:
    first, last = recent[0], recent[-1]
    span = last.at - first.at
    sheds = _bulkhead_sheds(first, last)
    if not sheds:
        return None
    parts = []
    fullest = 0.0
    for gate in last.bulkheads:
        if gate.name not in sheds:
            continue
        full = sum(
            1 for s in recent for b in s.bulkheads if b.name == gate.name and b.in_flight >= b.limit
        ) / len(recent)
        fullest = max(fullest, full)
        parts.append(
            f"{gate.name} shed {sheds[gate.name]} (its {gate.limit} slot(s) full in {full:.0%})"
        )
    total = sum(sheds.values())
    return Diagnosis(
        "bulkhead",
        f"{total} request(s) shed by routes' own max_concurrency in the last {round(span, 1):g} s: "
        f"{'; '.join(parts)}; all {last.limit} global slots busy in {_busy(recent):.0%}: "
        "the pool is not exhausted, the sub-limit holds these routes back on purpose; "
        "if they need more, raise max_concurrency (it serves at most max_concurrency / "
        "hold time requests per second)",
        {
            "bulkhead_shed": total,
            "bulkhead_full_fraction": round(fullest, 3),
            "busy_fraction": round(_busy(recent), 3),
        },
    )
