"""pybreaker behind one door: it keeps the breaker's state and its count of outages in a row.

pybreaker's own async support does not fit asyncio (``call_async`` needs tornado;
``call(async_fn)`` records a success when the coroutine is created), so a call's
*outcome* is handed to pybreaker here, through ``call`` with a synchronous function
that returns (success) or raises a stand-in (outage). Nothing else imports pybreaker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NoReturn

import pybreaker

from guardrails.breaker.state import CLOSED, HALF_OPEN, OPEN, BreakerState

__all__ = ["Circuit"]

_FROM_PYBREAKER = {
    pybreaker.STATE_CLOSED: CLOSED,
    pybreaker.STATE_OPEN: OPEN,
    pybreaker.STATE_HALF_OPEN: HALF_OPEN,
}

Moved = Callable[[BreakerState | None, BreakerState], None]


class _Outage(Exception):
    """Stands in for an outage when its outcome is handed to pybreaker."""


def _succeed() -> None:
    return None


def _fail(exc: BaseException) -> NoReturn:
    raise exc


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, moved: Moved) -> None:
        self.moved = moved

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = _FROM_PYBREAKER.get(str(getattr(old_state, "name", "")))
        self.moved(old, _FROM_PYBREAKER[new_state.name])


class Circuit:
    """pybreaker's circuit breaker, told outcomes instead of given calls to make.

    ``moved(old, new)`` hears every transition, synchronously, as it happens.
    """

    def __init__(self, *, fail_max: int, reset_timeout: float, name: str, moved: Moved) -> None:
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            throw_new_error_on_trip=False,
            listeners=[_Listener(moved)],
            name=name,
        )

    @property
    def failures(self) -> int:
        """Consecutive outages counted so far (reset by any success)."""
        return int(self._cb.fail_counter)

    def succeeded(self) -> None:
        """Count a success: resets the count, closes a half-open circuit."""
        self._cb.call(_succeed)

    def failed(self, error: str) -> None:
        """Count an outage (``error`` names it): may open the circuit."""
        # pybreaker raises the failure back at us: hand it a stand-in, so the caller's
        # own exception keeps its traceback free of pybreaker's frames.
        with contextlib.suppress(_Outage):
            self._cb.call(_fail, _Outage(error))

    def open(self) -> None:
        """Open now."""
        self._cb.open()

    def half_open(self) -> None:
        """Move to half-open now: a trial is about to run."""
        self._cb.half_open()

    def close(self) -> None:
        """Close now."""
        self._cb.close()
