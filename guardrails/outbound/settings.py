"""The settings of one :class:`~guardrails.outbound.transport.GuardedTransport`, validated once.

The transport takes them as keyword arguments; this frozen dataclass holds them checked
and normalised (durations in seconds, statuses as frozensets, the header name in lower
case), so a bad value fails when the transport is built, not on a call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from guardrails.breaker import BreakerSettings
from guardrails.retry import RetrySettings

__all__ = ["OutboundSettings", "seconds", "statuses"]

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)


def seconds(name: str, value: float | timedelta) -> float:
    """A duration given as seconds or a ``timedelta``, in seconds; at least 0, finite."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be seconds or a timedelta, not {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds, at least 0, not {value!r}")
    return float(value)


def statuses(name: str, values: Iterable[int]) -> frozenset[int]:
    """HTTP error statuses as a frozenset; each one checked."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a collection of HTTP status codes, e.g. (502, 503, 504)")
    found = frozenset(values)
    for status in found:
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(
                f"{name} holds {status!r}: only HTTP error statuses (400 to 599) can be listed"
            )
    return found


@dataclass(frozen=True, slots=True)
class OutboundSettings:
    """How a guarded transport treats each origin it calls (see ``GuardedTransport``).

    ``breaker`` and ``retry`` apply to every origin, each with its own breaker and retry
    budget; ``max_concurrency`` calls per origin at once, the rest wait up to
    ``queue_timeout`` seconds; ``failure_statuses`` count as outages, ``retry_statuses``
    are retried (idempotent requests only); ``deadline_header`` names the header that
    carries the time left to the origin, in milliseconds.
    """

    name: str = "default"
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    max_concurrency: int | None = None
    queue_timeout: float = 0.1
    failure_statuses: frozenset[int] = frozenset({502, 503, 504})
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    deadline_header: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(
                f"name must be a non-empty string naming the client (e.g. 'payments'), "
                f"not {self.name!r}"
            )
        if not isinstance(self.breaker, BreakerSettings):
            raise TypeError(f"breaker must be a guardrails BreakerSettings, not {self.breaker!r}")
        if self.breaker.probe is not None:
            raise ValueError(
                "an origin's breaker tests recovery with one real call (half-open); "
                "BreakerSettings(probe=...) is for the database breaker: leave probe unset here"
            )
        if not isinstance(self.retry, RetrySettings):
            raise TypeError(f"retry must be a guardrails RetrySettings, not {self.retry!r}")
        limit = self.max_concurrency
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"max_concurrency must be a whole number or None, not {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(
                f"max_concurrency must be >= 1 (calls in flight per origin) or None for no "
                f"limit, not {limit}"
            )
        object.__setattr__(self, "queue_timeout", seconds("queue_timeout", self.queue_timeout))
        object.__setattr__(
            self, "failure_statuses", statuses("failure_statuses", self.failure_statuses)
        )
        object.__setattr__(self, "retry_statuses", statuses("retry_statuses", self.retry_statuses))
        header = self.deadline_header
        if header is not None:
            if not isinstance(header, str) or not _TOKEN.fullmatch(header):
                raise ValueError(
                    f"deadline_header must be an HTTP header name such as "
                    f"'x-request-timeout-ms', or None (off), not {header!r}"
                )
            object.__setattr__(self, "deadline_header", header.lower())
