"""What guardrails knows about the request (or guarded call) running in this task.

The request's life object is the :class:`CallContext` of an admitted request;
``guard.read`` and ``guard.write`` open one when called outside a request. Pool
watchers and guarded calls read it through :func:`current` to learn the route a
connection was taken for, the request's deadline and its
:class:`~guardrails.outcome.Outcome`.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from guardrails.outcome import Outcome

if TYPE_CHECKING:
    from guardrails.guard import Guardrails

__all__ = ["NO_REQUEST", "CallContext", "current", "enter", "leave"]

NO_REQUEST = "<no request>"
"""Route reported for work outside any request (jobs, startup): guarded calls made
there, and connections checked out there."""


class CallContext:
    """State of one request (or one guarded call outside any request)."""

    __slots__ = ("_outcome", "checkouts", "deadline", "guard", "route")

    def __init__(
        self,
        route: str,
        outcome: Outcome | None = None,
        deadline: float | None = None,
        *,
        guard: Guardrails | None = None,
    ) -> None:
        self.route = route
        """Route template (``"/items/{id}"``), never the raw path."""
        self.guard = guard if guard is not None or outcome is None else outcome.guard
        self._outcome = outcome
        self.deadline = deadline
        """``anyio.current_time()`` by which the request must be answered, or ``None``."""
        self.checkouts: dict[int, Any] = {}
        """Connections checked out for this request and not yet returned, by key."""

    @property
    def outcome(self) -> Outcome:
        """What the request proved about the database so far (made when first needed:
        most requests never need one)."""
        outcome = self._outcome
        if outcome is None:
            if self.guard is None:
                raise RuntimeError("a CallContext needs a guard or an Outcome")
            outcome = self._outcome = Outcome(self.guard, route=self.route)
        return outcome


_current: ContextVar[CallContext | None] = ContextVar("guardrails_call", default=None)

current = _current.get
"""The context of the request or guarded call running in this task, if any."""

enter = _current.set
"""Make a context current; pass the token it returns to :func:`leave`."""

leave = _current.reset
"""Restore the context that was current before :func:`enter`."""
