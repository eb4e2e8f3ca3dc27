"""What one attempt's outcome says: an outage of the origin or its answer; safe to retry or not.

An origin is down when it cannot be reached or stops answering: connect errors, connect,
read and write timeouts, a dropped connection, and the statuses in ``failure_statuses``
(502, 503, 504 by default). A 4xx or a 500 is the origin's answer, not an outage. Only
outages count toward the origin's breaker, through the :data:`OUTAGE` marker that the
breaker is built to classify (:func:`breaker_settings`).
"""

from __future__ import annotations

import dataclasses
import email.utils
from collections.abc import Iterable
from datetime import datetime, timezone

import httpx

from guardrails.breaker import BreakerSettings
from guardrails.errors import Classifier, ErrorKind

__all__ = [
    "IDEMPOTENT_METHODS",
    "OUTAGE",
    "OriginOutage",
    "breaker_settings",
    "is_outage",
    "not_sent",
    "retried_after_sending",
    "retry_after",
    "timeout_phase",
]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""Methods retried after the request was sent; others only with an ``Idempotency-Key``."""

_OUTAGE_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
# Raised before the connection was made: not a byte of the request left this process.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
_PHASES: tuple[tuple[type[httpx.TimeoutException], str], ...] = (
    (httpx.ConnectTimeout, "connect"),
    (httpx.ReadTimeout, "read"),
    (httpx.WriteTimeout, "write"),
    (httpx.PoolTimeout, "pool"),
)


class OriginOutage(Exception):
    """Stands for "the origin is down" when an attempt's outcome is handed to its breaker."""


OUTAGE = OriginOutage("origin outage")
"""The one marker the transport records; never raised, so it gathers no traceback."""


def _marker(exc: BaseException) -> ErrorKind | None:
    return ErrorKind.OUTAGE if isinstance(exc, OriginOutage) else None


def breaker_settings(settings: BreakerSettings) -> BreakerSettings:
    """The settings an origin's breaker is built with: the user's, classifying the marker.

    The user's ``classifiers`` are applied by :func:`is_outage` to the transport's own
    exceptions instead; the breaker itself only ever sees :data:`OUTAGE` or success.
    """
    return dataclasses.replace(settings, classifiers=(_marker,))


def is_outage(exc: BaseException, classifiers: Iterable[Classifier] = ()) -> bool:
    """Whether ``exc``, raised by an attempt, means the origin is down.

    ``classifiers`` (the user's ``BreakerSettings.classifiers``) decide first: ``OUTAGE``
    counts, any other kind does not. Then connect errors, connect/read/write timeouts and
    dropped connections count; a pool timeout (this process's own connection pool), a
    bad URL or cancellation does not.
    """
    for classifier in classifiers:
        kind = classifier(exc)
        if kind is not None:
            return ErrorKind(kind) is ErrorKind.OUTAGE
    return isinstance(exc, _OUTAGE_ERRORS)


def not_sent(exc: BaseException) -> bool:
    """Whether ``exc`` proves the request never left (the connection was never made)."""
    return isinstance(exc, _NOT_SENT)


def retried_after_sending(exc: BaseException) -> bool:
    """Whether ``exc`` is worth an idempotent retry after the request may have been sent."""
    return isinstance(exc, _OUTAGE_ERRORS)


def timeout_phase(exc: BaseException) -> str | None:
    """The key of ``request.extensions["timeout"]`` whose timeout ``exc`` is, if any."""
    for kind, phase in _PHASES:
        if isinstance(exc, kind):
            return phase
    return None


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the response's ``Retry-After`` asks to wait (seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
