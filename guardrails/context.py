"""What guardrails knows about the request (or guarded call) running in this task.

The middleware opens a :class:`CallContext` per admitted request; ``guard.read`` and
``guard.write`` open one when called outside a request. Pool watchers and the breaker
read it through :func:`current` to learn the route a connection was taken for, the
request's deadline, and whether an outcome was already recorded.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import Any

__all__ = ["NO_REQUEST", "CallContext", "current", "enter", "leave", "var"]

NO_REQUEST = "<no request>"
"""Route reported for work outside any request (jobs, startup): guarded calls made
there, and connections checked out there."""


class CallContext:
    """State of one request (or one guarded call outside any request)."""

    __slots__ = (
        "checkouts",
        "deadline",
        "failure",
        "pool_timeout",
        "recorded",
        "route",
        "touched",
        "trial",
    )

    def __init__(self, route: str, deadline: float | None = None, trial: Any = None) -> None:
        self.route = route
        """Route template (``"/items/{id}"``), never the raw path."""
        self.deadline = deadline
        """``anyio.current_time()`` by which the request must be answered, or ``None``."""
        self.trial = trial
        """The breaker's half-open trial ticket this request holds, if any."""
        self.recorded = False
        """Whether a breaker outcome has been recorded for this request already."""
        self.failure: BaseException | None = None
        """The last exception recorded to the breaker for this request, so it counts once."""
        self.pool_timeout: BaseException | None = None
        """A pool timeout a watcher saw in this request that no one has recorded yet."""
        self.touched = False
        """Whether a watched pool handed this request a connection (it reached the database)."""
        self.checkouts: dict[int, Any] = {}
        """Connections checked out for this request and not yet returned, by key."""


var: ContextVar[CallContext | None] = ContextVar("guardrails_call", default=None)
"""The context variable itself, for the middleware's hot path."""
_current = var


def current() -> CallContext | None:
    """The context of the request or guarded call running in this task, if any."""
    return _current.get()


def enter(context: CallContext) -> Token[CallContext | None]:
    """Make ``context`` current; pass the token to :func:`leave`."""
    return _current.set(context)


def leave(token: Token[CallContext | None]) -> None:
    """Restore the context that was current before :func:`enter`."""
    _current.reset(token)
