"""The breaker's states, and how a move between them is told: a log line, then the listeners.

An outage the breaker counts is kept as a small record (:func:`outage_record`) that
snapshots show and :func:`describe_outage` puts into words. Every transition is logged
once on the ``guardrails.breaker`` logger (a warning when it opens, naming the outage
that opened it) and handed to each listener as ``(old, new, snapshot)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from enum import Enum
from typing import Any

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "Announcer",
    "BreakerState",
    "StateListener",
    "describe_outage",
    "outage_record",
]

logger = logging.getLogger("guardrails.breaker")


class BreakerState(str, Enum):
    """The breaker's states; the values are what snapshots and health show."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN

StateListener = Callable[[str | None, str, dict[str, Any]], None]
"""Hears a breaker transition as ``(old, new, snapshot)``; must not block or raise."""


def outage_record(
    exc: BaseException | None, route: str | None, pool: str | None, probe: bool
) -> dict[str, Any]:
    """The record of one outage counted (a :attr:`Breaker.last_outage`): its error's type,
    the route and pool it was met on, whether the probe met it, and when."""
    return {
        "error": type(exc).__name__ if exc else "outage",
        "route": route,
        "pool": pool,
        "probe": probe,
        "at": datetime.now(timezone.utc).isoformat(),
    }


def describe_outage(outage: dict[str, Any]) -> str:
    """Words for a :attr:`Breaker.last_outage`: ``OperationalError on /items/{id} (pool
    main)``, ``TimeoutError (pool main)``, ``OperationalError in the recovery probe``."""
    where = " in the recovery probe" if outage.get("probe") else ""
    if outage.get("route"):
        where += f" on {outage['route']}"
    if outage.get("pool"):
        where += f" (pool {outage['pool']})"
    return f"{outage.get('error') or 'an outage'}{where}"


class Announcer:
    """Tells one breaker's transitions: logs each once, then calls every listener."""

    def __init__(self, on_change: StateListener | None) -> None:
        self._on_change = on_change
        self._listeners: list[StateListener] = []

    def add(self, listener: StateListener) -> None:
        """Also call ``listener(old, new, snapshot)`` on every transition."""
        if not callable(listener):
            raise TypeError(f"listener must be a callable (old, new, snapshot), not {listener!r}")
        self._listeners.append(listener)

    def remove(self, listener: StateListener) -> None:
        """Stop calling ``listener``; no error if it was not added."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def announce(
        self,
        name: str,
        old: BreakerState | None,
        new: BreakerState,
        snapshot: dict[str, Any],
        opened_by: dict[str, Any] | None,
    ) -> None:
        """Log the move from ``old`` to ``new`` of the breaker ``name``, then tell each
        listener; a listener that raises is logged and the rest still hear it."""
        was = old.value if old is not None else None
        cause = describe_outage(opened_by) if new is OPEN and opened_by else ""
        logger.log(
            logging.WARNING if new is OPEN else logging.INFO,
            "%s circuit breaker %s -> %s (failures %d, retry after %ds%s)",
            name,
            was or "?",
            new.value,
            snapshot["failures"],
            snapshot["retry_after"],
            f"; opened by {cause}" if cause else "",
            extra={"guardrails": {"event": "breaker_state", "old": was, **snapshot}},
        )
        for listener in (self._on_change, *self._listeners):
            if listener is None:
                continue
            try:
                listener(was, new.value, snapshot)
            except Exception:
                # A listener's bug must not undo a transition already made.
                logger.exception("%s breaker listener %r failed", name, listener)
