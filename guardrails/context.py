"""What guardrails knows about the request (or guarded call) running in this task.

The request's life object is the :class:`CallContext` of an admitted request;
``guard.read`` and ``guard.write`` open one when called outside a request. Pool
watchers and guarded calls read it through :func:`current` to learn the route a
connection was taken for, the request's deadline and its :class:`~guardrails.outcome.Outcome`.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guardrails.outcome import Outcome

__all__ = ["NO_REQUEST", "CallContext", "current", "enter", "leave"]

NO_REQUEST = "<no request>"
"""Route reported for work outside any request (jobs, startup): guarded calls made
there, and connections checked out there."""


class CallContext:
    """State of one request (or one guarded call outside any request)."""

    __slots__ = ("checkouts", "deadline", "outcome", "route")

    def __init__(self, route: str, outcome: Outcome, deadline: float | None = None) -> None:
        self.route = route
        """Route template (``"/items/{id}"``), never the raw path."""
        self.outcome = outcome
        """What the request proved about the database so far."""
        self.deadline = deadline
        """``anyio.current_time()`` by which the request must be answered, or ``None``."""
        self.checkouts: dict[int, Any] = {}
        """Connections checked out for this request and not yet returned, by key."""


_current: ContextVar[CallContext | None] = ContextVar("guardrails_call", default=None)


def current() -> CallContext | None:
    """The context of the request or guarded call running in this task, if any."""
    return _current.get()


def enter(context: CallContext) -> Token[CallContext | None]:
    """Make ``context`` current; pass the token to :func:`leave`."""
    return _current.set(context)


def leave(token: Token[CallContext | None]) -> None:
    """Restore the context that was current before :func:`enter`."""
    _current.reset(token)
