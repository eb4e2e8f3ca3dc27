"""How a breaker is configured: when it opens, and how it tests recovery.

:class:`BreakerSettings` is checked when it is made, so a bad value fails at
construction with a message that says what to change.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from guardrails.errors import Classifier

__all__ = ["BreakerSettings", "Probe"]

Probe = Callable[[], Awaitable[object]]
"""An async callable that succeeds when the database can serve again."""


def _seconds(value: object, name: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or a timedelta, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """How the breaker decides that the database is down, and how it tests recovery.

    ``fail_max`` consecutive outages (pool timeouts, refused or dropped connections,
    ``too many connections``) open it. Without a probe, one user request is let
    through as a trial once ``reset_timeout`` seconds have passed (half-open); it
    closes the breaker on success and opens it again on failure.

    ``probe``, an async callable such as ``lambda: ping(engine)``, makes the breaker
    test recovery itself, every ``probe_interval`` seconds while open, each run cut
    off after ``probe_timeout``: it closes within about one ``probe_interval`` of the
    database accepting connections, and no user request is spent on a trial.
    ``classifiers`` are extra rules for :func:`guardrails.errors.classify`.
    """

    fail_max: int = 5
    reset_timeout: float = 30.0
    probe: Probe | None = None
    probe_timeout: float = 2.0
    probe_interval: float = 1.0
    classifiers: tuple[Classifier, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.fail_max, bool) or not isinstance(self.fail_max, int):
            raise TypeError(f"fail_max must be a whole number, not {self.fail_max!r}")
        if self.fail_max < 1:
            raise ValueError(
                f"fail_max must be >= 1, not {self.fail_max}: it is how many outages in a "
                "row open the breaker (5 is a common choice)"
            )
        for name in ("reset_timeout", "probe_timeout", "probe_interval"):
            object.__setattr__(self, name, _seconds(getattr(self, name), name))
        if self.probe is not None and not callable(self.probe):
            raise TypeError(
                f"probe must be an async callable taking no arguments, not {self.probe!r}"
            )
        object.__setattr__(self, "classifiers", tuple(self.classifiers))
