"""Rates and seeded draws shared by the fault injectors: validated once, drawn cheaply.

A fault "at a rate" happens to that share of calls, decided by a ``random.Random`` of
its own: with a ``seed`` the same calls are hit on every run.
"""

from __future__ import annotations

import math
import random
import threading
from datetime import timedelta

__all__ = ["Draw", "rate", "seconds", "seed_of"]


def rate(name: str, value: object) -> float:
    """Validate a rate: a share of calls between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number between 0 and 1, not {value!r}")
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(
            f"{name} must be between 0 and 1 (the share of calls hit, 0.1 = one in ten), "
            f"not {value!r}"
        )
    return float(value)


def seconds(name: str, value: object) -> float:
    """Validate a duration: seconds (>= 0) or a ``timedelta``."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or a timedelta, not {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be zero or a positive number of seconds, not {value!r}")
    return float(value)


def seed_of(value: object) -> int | None:
    """Validate a seed: an int, or None for a different sequence on every run."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"seed must be an int or None, not {value!r}")
    return value


class Draw:
    """Seeded draws, safe to share between threads (sync pools call from workers)."""

    __slots__ = ("_lock", "_random")

    def __init__(self, seed: int | None) -> None:
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def hit(self, share: float) -> bool:
        """Whether this call is among the ``share`` hit; draws nothing for 0 or 1."""
        if share <= 0.0:
            return False
        if share >= 1.0:
            return True
        with self._lock:
            return self._random.random() < share

    def uniform(self) -> float:
        """A number in [0, 1) from the same sequence."""
        with self._lock:
            return self._random.random()
