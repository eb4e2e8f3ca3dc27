"""Chaos in staging: a pure-ASGI middleware that slows, faults or answers requests at rates.

Off unless enabled explicitly (``enabled=True``, or ``GUARDRAILS_CHAOS=1`` in the
environment); off, it costs one attribute check per request. On, each route's
:class:`ChaosRule` draws, per request and from ``seed``, whether to add latency, to
make the request's database acquires fail (the watched pools refuse them with their
own timeout exception, through the pool watchers' fault hook, so the guard's
classifier, breaker, fallback and telemetry see a real-looking outage), or to answer
with an error status without running the app. At most ``max_active`` requests are
under chaos at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import anyio
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardrails.asgi.middleware import route_path
from guardrails.guard import Guardrails
from guardrails.testing.rates import Draw, rate, seconds, seed_of

if TYPE_CHECKING:
    import re

    from guardrails.pools import PoolWatcher

__all__ = ["ENV_VAR", "HEADER", "ChaosMiddleware", "ChaosRule"]

logger = logging.getLogger("guardrails.testing")

ENV_VAR = "GUARDRAILS_CHAOS"
"""Set to ``1`` to enable a :class:`ChaosMiddleware` built with ``enabled=None``."""
HEADER = "x-guardrails-chaos"
"""The request header of ``header_control`` (and the response header naming what was done)."""
MAX_HEADER_LATENCY = 30.0
"""Latency a request header may ask for, at most (seconds)."""

_FAULTED: ContextVar[bool] = ContextVar("guardrails_chaos_fault", default=False)
_PATHS_KEPT = 2048
_RETRY_AFTER_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class ChaosRule:
    """What :class:`ChaosMiddleware` does to the requests of one route, each at a rate.

    - ``latency_rate`` of requests wait ``latency`` seconds before the app runs;
    - ``fault_rate`` of requests find the database down: each acquire they make on a
      pool the guard watches is refused with that pool's timeout exception;
    - ``outcome_rate`` of requests are answered ``outcome_status`` at once, without
      running the app (``Retry-After: 1`` on 429 and 503).
    """

    latency: float | timedelta = 0.0
    latency_rate: float = 0.0
    fault_rate: float = 0.0
    outcome_rate: float = 0.0
    outcome_status: int = 503

    def __post_init__(self) -> None:
        object.__setattr__(self, "latency", seconds("latency", self.latency))
        for name in ("latency_rate", "fault_rate", "outcome_rate"):
            object.__setattr__(self, name, rate(name, getattr(self, name)))
        status = self.outcome_status
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(
                f"outcome_status must be an HTTP error status (400-599), not {status!r}"
            )

    @property
    def active(self) -> bool:
        """Whether this rule ever injects anything."""
        slow = self.latency_rate > 0 and seconds("latency", self.latency) > 0
        return slow or self.fault_rate > 0 or self.outcome_rate > 0


class _ChaosFault:
    """The pool fault of chaos: refuse the acquires of requests chosen for a fault."""

    __slots__ = ()

    def plan(self, watcher: PoolWatcher) -> tuple[float, bool]:
        return 0.0, _FAULTED.get()


_FAULT = _ChaosFault()


class _Injection:
    """What chaos does to one request."""

    __slots__ = ("fault", "latency", "status")

    def __init__(self, latency: float, fault: bool, status: int | None) -> None:
        self.latency = latency
        self.fault = fault
        self.status = status

    def label(self) -> bytes:
        done = [
            name
            for name, on in (
                ("latency", self.latency > 0),
                ("fault", self.fault),
                ("outcome", self.status is not None),
            )
            if on
        ]
        return ",".join(done).encode()


class ChaosMiddleware:
    """Pure ASGI middleware injecting latency, database faults and error answers, at rates.

    ::

        app.add_middleware(ChaosMiddleware, guard=guard, seed=1, routes={
            "/dashboard": ChaosRule(fault_rate=0.05, latency=0.3, latency_rate=0.1),
        })
        app.add_middleware(GuardrailsMiddleware, guard=guard)   # added last: outside

    Off unless ``enabled=True``, or ``enabled=None`` (the default) and the environment
    has ``GUARDRAILS_CHAOS=1``; ``enabled=False`` keeps it off whatever the environment
    says. ``routes`` maps Starlette path patterns to a :class:`ChaosRule` (the first
    pattern that matches wins); ``default`` covers other paths (None: untouched).
    ``guard`` is needed for database faults. Draws come from ``seed``. At most
    ``max_active`` requests are under chaos at once; others pass untouched.

    ``header_control=True`` lets each request choose its own chaos with the header
    ``X-Guardrails-Chaos: latency=0.5, fault, outcome=503``. **Unsafe for untrusted
    callers**: anyone who can send the header can slow or fail requests. Use it only
    where every client is yours, e.g. an internal staging environment.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        enabled: bool | None = None,
        guard: Guardrails | None = None,
        routes: Mapping[str, ChaosRule] | None = None,
        default: ChaosRule | None = None,
        seed: int | None = None,
        max_active: int = 10,
        header_control: bool = False,
    ) -> None:
        if enabled is None:
            enabled = os.environ.get(ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}
        if not isinstance(enabled, bool):
            raise TypeError(
                f"enabled must be True, False or None (read {ENV_VAR}), not {enabled!r}"
            )
        if guard is not None and not isinstance(guard, Guardrails):
            raise TypeError(f"guard must be a guardrails Guardrails, not {guard!r}")
        if routes is not None and not isinstance(routes, Mapping):
            raise TypeError(
                "routes must be a mapping of path pattern to ChaosRule, e.g. "
                "{'/dashboard': ChaosRule(fault_rate=0.1)}"
            )
        rules = dict(routes or {})
        for pattern, rule in [*rules.items(), ("default", default)]:
            if rule is not None and not isinstance(rule, ChaosRule):
                raise TypeError(f"the rule for {pattern!r} must be a ChaosRule, not {rule!r}")
            if rule is not None and rule.fault_rate > 0 and guard is None:
                raise ValueError(
                    f"the rule for {pattern!r} injects database faults: pass guard=guard so "
                    "that its watched pools can refuse the chosen requests"
                )
        if isinstance(max_active, bool) or not isinstance(max_active, int) or max_active < 1:
            raise ValueError(f"max_active must be a whole number >= 1, not {max_active!r}")
        if not isinstance(header_control, bool):
            raise TypeError(f"header_control must be True or False, not {header_control!r}")
        self.app = app
        self.enabled = enabled
        """Whether chaos is injected at all (fixed at construction)."""
        self.guard = guard
        self.default = default
        self.max_active = max_active
        self.header_control = header_control
        self._patterns: list[tuple[re.Pattern[str], ChaosRule]] = []
        for pattern, rule in rules.items():
            if not isinstance(pattern, str) or not pattern.startswith("/"):
                raise ValueError(
                    f"chaos route {pattern!r} must be a path pattern such as '/items/{{id}}'"
                )
            self._patterns.append((compile_path(pattern)[0], rule))
        self._rules: dict[str, ChaosRule | None] = {}
        self._draw = Draw(seed_of(seed))
        self.active = 0
        """Requests under chaos right now."""
        self.injected = {"latency": 0, "fault": 0, "outcome": 0, "capped": 0}
        """Requests delayed, faulted, answered by chaos, and left alone for ``max_active``."""
        configured = any(r.active for r in (*rules.values(), default) if r is not None)
        if not enabled and (configured or header_control):
            logger.info("chaos is configured but off: pass enabled=True or set %s=1", ENV_VAR)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        injection = self._choose(scope)
        if injection is None:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_active:
            self.injected["capped"] += 1
            await self.app(scope, receive, send)
            return
        self.active += 1
        try:
            await self._inject(injection, scope, receive, send)
        finally:
            self.active -= 1

    # -- choosing --------------------------------------------------------------------------

    def _choose(self, scope: Scope) -> _Injection | None:
        if self.header_control:
            asked = _header(scope)
            if asked is not None:
                return self._from_header(asked)
        rule = self._rule_for(route_path(scope) if scope.get("root_path") else scope["path"])
        if rule is None:
            return None
        draw = self._draw
        latency = rule.latency if draw.hit(rule.latency_rate) else 0.0
        assert isinstance(latency, float)
        fault = draw.hit(rule.fault_rate)
        status = rule.outcome_status if draw.hit(rule.outcome_rate) else None
        if latency <= 0 and not fault and status is None:
            return None
        return _Injection(latency, fault, status)

    def _rule_for(self, path: str) -> ChaosRule | None:
        try:
            return self._rules[path]
        except KeyError:
            pass
        found = self.default
        for regex, rule in self._patterns:
            if regex.match(path) is not None:
                found = rule
                break
        if len(self._rules) >= _PATHS_KEPT:
            del self._rules[next(iter(self._rules))]
        self._rules[path] = found
        return found

    def _from_header(self, value: str) -> _Injection | None:
        latency, fault, status = 0.0, False, None
        for token in value.split(","):
            name, _, argument = token.strip().partition("=")
            name = name.strip().lower()
            try:
                if name == "latency":
                    latency = min(MAX_HEADER_LATENCY, max(0.0, float(argument)))
                elif name == "fault":
                    fault = self.guard is not None
                elif name == "outcome":
                    status = int(argument) if argument.strip() else 503
                    if not 400 <= status <= 599:
                        status = None
            except ValueError:
                continue  # a value that is not a number: that token is ignored
        if latency <= 0 and not fault and status is None:
            return None
        return _Injection(latency, fault, status)

    # -- injecting -------------------------------------------------------------------------

    async def _inject(
        self, injection: _Injection, scope: Scope, receive: Receive, send: Send
    ) -> None:
        label = injection.label()

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (HEADER.encode(), label)],
                }
            await send(message)

        if injection.latency > 0:
            self.injected["latency"] += 1
            await anyio.sleep(injection.latency)
        if injection.status is not None:
            self.injected["outcome"] += 1
            await _answer(marked, injection.status)
            return
        if not injection.fault:
            await self.app(scope, receive, marked)
            return
        self.injected["fault"] += 1
        self._install()
        token = _FAULTED.set(True)
        try:
            await self.app(scope, receive, marked)
        finally:
            _FAULTED.reset(token)

    def _install(self) -> None:
        # Pools may be watched after the middleware is built (in the app's lifespan):
        # the fault goes on every watcher that has none, when a fault is first needed.
        assert self.guard is not None
        for watcher in self.guard.watchers:
            if watcher.fault is None:
                watcher.fault = _FAULT

    def snapshot(self) -> dict[str, object]:
        """Whether chaos is on, requests under it now, and what it injected so far."""
        return {"enabled": self.enabled, "active": self.active, **self.injected}


def _header(scope: Scope) -> str | None:
    wanted = HEADER.encode()
    for name, value in scope.get("headers", ()):
        if name.lower() == wanted:
            text: str = value.decode("latin-1")
            return text
    return None


async def _answer(send: Send, status: int) -> None:
    body = b'{"error": "chaos"}'
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status in _RETRY_AFTER_STATUSES:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
