"""What an outbound call raises when guardrails refuses it or cuts it short.

The hierarchy, under :mod:`guardrails.errors`::

    Unavailable
    └── Shed
        └── OriginUnavailable   an outbound call refused (or cut short) for its origin's sake

``OriginUnavailable`` carries what an answer to the inbound request needs: the origin
it was for, the reason, and ``retry_after``.
"""

from __future__ import annotations

from enum import Enum

from guardrails.errors import Shed, Unavailable

__all__ = ["OriginUnavailable", "Refusal"]


class Refusal(str, Enum):
    """Why an outbound call was refused; the value is what metrics and logs show."""

    BREAKER_OPEN = "breaker_open"
    """The origin's breaker is open, or its one half-open trial is under way."""
    QUEUE_TIMEOUT = "queue_timeout"
    """``max_concurrency`` calls to the origin were in flight for the whole wait."""
    DEADLINE = "deadline"
    """The inbound request's deadline left no time to start, or ran out before the answer."""


_TEXT = {
    Refusal.BREAKER_OPEN: "circuit breaker open, call refused",
    Refusal.QUEUE_TIMEOUT: "too many calls in flight, call refused",
    Refusal.DEADLINE: "the request's deadline leaves no time for this call",
}


class OriginUnavailable(Shed):
    """An outbound call refused, or cut short, for its origin; try again after ``retry_after``.

    ``origin`` is ``scheme://host:port`` (never a path or credentials); ``reason`` is a
    :class:`Refusal`: ``"breaker_open"`` (no connection was attempted),
    ``"queue_timeout"`` (the origin's ``max_concurrency`` was reached) or ``"deadline"``
    (the inbound request's deadline left no time, or passed before the origin answered).
    It is a :class:`~guardrails.errors.Shed`, so ``except gr.Shed`` and
    ``except gr.Unavailable`` both catch it.
    """

    def __init__(self, origin: str, reason: Refusal | str, *, retry_after: int = 1) -> None:
        refusal = Refusal(reason)
        Unavailable.__init__(self, f"{origin}: {_TEXT[refusal]}", retry_after=retry_after)
        self.origin = origin
        self.reason = refusal.value
