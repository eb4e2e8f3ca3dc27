"""The health endpoint: the guard's state as ``application/health+json``.

The body follows the IETF "Health Check Response Format for HTTP APIs" draft
(``status`` pass | warn | fail, ``checks`` keyed ``component:measurement``, ``output``
for humans). Three views, for people and for orchestrators:

- the full report (``guard.health``): 200 for pass and warn, 503 for fail; what counts
  as fail is configurable (default: the breaker is open);
- liveness (``guard.health.live``): is the process up? 200 whenever the guard can
  report at all. An open breaker never fails liveness: the database being down is
  not cured by restarting the app, and failing liveness for it restarts healthy
  processes in a loop;
- readiness (``guard.health.ready``): should this process get traffic? 503 when the
  report's status is fail.

The endpoint reads in-memory state only: it never touches the database, bypasses the
limiter (it is exempt by its own policy), and never shows DSNs, database hosts, SQL
or exception text. Outbound checks are named by their origin (``scheme://host:port``,
never a path, query or credentials).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send

from guardrails.policy import POLICY_ATTRIBUTE, Policy

if TYPE_CHECKING:
    from guardrails.guard import Guardrails

__all__ = ["FAIL_CONDITIONS", "HealthEndpoint", "outbound_checks"]

_EXEMPT = Policy(exempt=True)
_HEADERS = [
    (b"content-type", b"application/health+json"),
    (b"cache-control", b"no-store"),
]

FAIL_CONDITIONS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "breaker_open": lambda snapshot: snapshot["breaker"]["state"] == "open",
    "breaker_half_open": lambda snapshot: snapshot["breaker"]["state"] == "half_open",
    "read_only": lambda snapshot: bool(snapshot["read_only"]["enabled"]),
    "queue_full": lambda snapshot: (
        snapshot["limiter"]["queued"] >= snapshot["limiter"].get("max_queue", 1 << 62)
    ),
}
"""Names accepted by ``fail_on``: each says when the report's status is ``fail``."""


class HealthEndpoint:
    """An ASGI app answering with the guard's health; ``Route(path, guard.health)``.

    ``fail_on`` names the conditions (keys of :data:`FAIL_CONDITIONS`) that make the
    status ``fail`` and the answer 503; by default only an open breaker does.
    ``.live`` and ``.ready`` are the liveness and readiness views.
    """

    def __init__(
        self, guard: Guardrails, *, fail_on: Iterable[str] = ("breaker_open",), view: str = "full"
    ) -> None:
        self.guard = guard
        self.fail_on = tuple(fail_on)
        unknown = [name for name in self.fail_on if name not in FAIL_CONDITIONS]
        if unknown:
            raise ValueError(
                f"unknown fail_on condition(s) {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(sorted(FAIL_CONDITIONS))}"
            )
        if view not in ("full", "live", "ready"):
            raise ValueError(f"view must be 'full', 'live' or 'ready', not {view!r}")
        self.view = view

    @property
    def live(self) -> HealthEndpoint:
        """Liveness view: 200 while the guard can report, whatever the database does."""
        return HealthEndpoint(self.guard, fail_on=self.fail_on, view="live")

    @property
    def ready(self) -> HealthEndpoint:
        """Readiness view: 503 while the report's status is ``fail``."""
        return HealthEndpoint(self.guard, fail_on=self.fail_on, view="ready")

    def judge(self, snapshot: dict[str, Any]) -> tuple[str, list[str]]:
        """The status (``pass`` | ``warn`` | ``fail``) of a guard's snapshot, and the
        ``fail_on`` conditions that hold; the one place the status is decided."""
        failing = [name for name in self.fail_on if FAIL_CONDITIONS[name](snapshot)]
        if failing:
            return "fail", failing
        triage = snapshot.get("triage") or {}
        troubled = (
            snapshot["read_only"]["enabled"]
            or snapshot["limiter"]["queued"]
            or snapshot["breaker"]["state"] != "closed"
            or snapshot.get("warnings")
            or triage.get("kind", "none") != "none"
        )
        return ("warn" if troubled else "pass"), []

    def report(self) -> dict[str, Any]:
        """The health document as a dict (what the endpoint sends, as JSON)."""
        snapshot = self.guard.snapshot()
        return build_report(snapshot, self.judge(snapshot))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError("the guardrails health endpoint answers HTTP requests only")
        try:
            document = self.report()
        except Exception:
            # The guard itself is broken: the one thing liveness must report.
            document = {"status": "fail", "output": "guardrails could not report its state"}
            code = 500
        else:
            if self.view == "live":
                document = {"status": "pass", "description": "guardrails: process is up"}
                code = 200
            else:
                code = 503 if document["status"] == "fail" else 200
        body = json.dumps(document, separators=(",", ":")).encode()
        headers = [*_HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        if scope.get("method") == "HEAD":
            body = b""
        await send({"type": "http.response.body", "body": body})


setattr(HealthEndpoint, POLICY_ATTRIBUTE, _EXEMPT)


def _check(
    value: Any, unit: str | None, status: str, now: str, **extra: Any
) -> list[dict[str, Any]]:
    entry: dict[str, Any] = {"observedValue": value, "status": status, "time": now}
    if unit is not None:
        entry["observedUnit"] = unit
    entry.update(extra)
    return [entry]


def build_report(snapshot: dict[str, Any], judged: tuple[str, list[str]]) -> dict[str, Any]:
    """Turn ``guard.snapshot()`` and its :meth:`HealthEndpoint.judge` into the document."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    status, failing = judged
    breaker = snapshot["breaker"]
    limiter = snapshot["limiter"]
    read_only = snapshot["read_only"]
    breaker_status = {"closed": "pass", "half_open": "warn", "open": "fail"}[breaker["state"]]
    checks: dict[str, list[dict[str, Any]]] = {
        "breaker:state": _check(
            breaker["state"],
            None,
            breaker_status,
            now,
            componentType="datastore",
            retryAfter=breaker["retry_after"],
            openedAt=breaker["opened_at"],
        ),
        "breaker:failures": _check(
            breaker["failures"], "consecutive outages", "pass", now, threshold=breaker["fail_max"]
        ),
        "breaker:retry_after": _check(breaker["retry_after"], "s", breaker_status, now),
        "breaker:refused": _check(breaker.get("refused_total", 0), "requests", "pass", now),
        "limiter:in_flight": _check(
            limiter["in_flight"],
            "requests",
            "pass",
            now,
            limit=limiter["limit"],
            utilization=round(limiter["utilization"], 3),
        ),
        "limiter:queued": _check(
            limiter["queued"], "requests", "warn" if limiter["queued"] else "pass", now
        ),
        "limiter:shed": _check(limiter.get("shed_total", 0), "requests", "pass", now),
        "read_only:enabled": _check(
            read_only["enabled"], None, "warn" if read_only["enabled"] else "pass", now
        ),
    }
    adaptive = limiter.get("adaptive")
    if adaptive is not None:
        checks["limiter:adaptive_limit"] = _check(
            adaptive["limit"],
            "slots",
            "warn" if adaptive["limit"] < adaptive["ceiling"] else "pass",
            now,
            ceiling=adaptive["ceiling"],
            floor=adaptive["floor"],
            baselineSeconds=adaptive["baseline_seconds"],
            gradient=adaptive["gradient"],
        )
    retry = snapshot.get("retry")
    if retry is not None:
        checks["retry:budget_remaining"] = _check(
            retry["remaining"], "retries", "warn" if retry["remaining"] == 0 else "pass", now
        )
    triage = snapshot.get("triage")
    if triage is not None:
        checks["triage:kind"] = _check(
            triage["kind"],
            None,
            "pass" if triage["kind"] == "none" else "warn",
            now,
            output=triage["evidence"],
        )
    for warning in snapshot.get("warnings", ()):
        checks[f"warning:{warning['check']}"] = _check(
            warning["observed"],
            None,
            "warn",
            now,
            threshold=warning["threshold"],
            output=warning["text"],
        )
    for pool in snapshot.get("pools", ()):
        name = f"pool:{pool.get('name', pool.get('kind', 'pool'))}"
        checks[f"{name}:checked_out"] = _check(
            pool.get("checked_out"), "connections", "pass", now, size=pool.get("size")
        )
        suspects = pool.get("leak_suspects_total", 0)
        checks[f"{name}:leak_suspects"] = _check(
            suspects, "connections", "warn" if suspects else "pass", now
        )
        timeouts = pool.get("timeouts_total", 0)
        checks[f"{name}:timeouts"] = _check(timeouts, "timeouts", "pass", now)
        if pool.get("waiting") is not None:
            checks[f"{name}:waiting"] = _check(pool["waiting"], "callers", "pass", now)
        acquire_p95 = pool.get("acquire_wait_p95_seconds")
        if acquire_p95 is not None:
            checks[f"{name}:acquire_wait_p95"] = _check(round(acquire_p95, 4), "s", "pass", now)
    outbound = outbound_checks(snapshot.get("outbound", ()), now)
    checks.update(outbound)
    if status == "pass" and any(check[0]["status"] != "pass" for check in outbound.values()):
        status = "warn"
    document: dict[str, Any] = {
        "status": status,
        "description": "guardrails: database admission, circuit breaker and pools",
        "checks": checks,
    }
    output = _output(snapshot, failing)
    if output:
        document["output"] = output
    return document


def outbound_checks(transports: Iterable[dict[str, Any]], now: str) -> dict[str, Any]:
    """One check per origin of each ``GuardedTransport``: its breaker's state.

    An open origin is a warning, never a failure: restarting this process or taking it
    out of the load balancer does not bring another service back.
    """
    checks: dict[str, Any] = {}
    for transport in transports:
        for origin in transport["origins"]:
            breaker = origin["breaker"]
            state = breaker["state"]
            note = _OUTBOUND_NOTES.get(state)
            checks[f"outbound:{transport['name']}:{origin['origin']}"] = _check(
                state,
                None,
                "pass" if state == "closed" else "warn",
                now,
                componentType="component",
                retryAfter=breaker["retry_after"],
                failures=breaker["failures"],
                inFlight=origin["in_flight"],
                **({"output": note.format(origin["origin"])} if note else {}),
            )
    return checks


_OUTBOUND_NOTES = {
    "open": "{}: circuit breaker open, calls refused",
    "half_open": "{}: circuit breaker half-open, one trial call under way",
}


def _output(snapshot: dict[str, Any], failing: list[str]) -> str:
    notes: list[str] = []
    breaker = snapshot["breaker"]
    if breaker["state"] == "open":
        notes.append(
            f"circuit breaker open: database calls refused for {breaker['retry_after']} s more"
        )
    elif breaker["state"] == "half_open":
        notes.append("circuit breaker half-open: testing whether the database is back")
    if snapshot["read_only"]["enabled"]:
        notes.append("read-only mode: writes are refused")
    queued = snapshot["limiter"]["queued"]
    if queued:
        notes.append(f"{queued} requests waiting for a database slot")
    triage = snapshot.get("triage") or {}
    if triage.get("kind", "none") != "none":
        notes.append(f"pool trouble: {triage['kind']}")
    notes.extend(warning["text"] for warning in snapshot.get("warnings", ()))
    for transport in snapshot.get("outbound", ()):
        for origin in transport["origins"]:
            if origin["breaker"]["state"] != "closed":
                notes.append(_OUTBOUND_NOTES[origin["breaker"]["state"]].format(origin["origin"]))
    if failing:
        notes.append(f"failing: {', '.join(failing)}")
    return "; ".join(notes)
