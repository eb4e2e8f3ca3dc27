"""How guardrails talks to Redis: one way to make a client, and a pause after failures.

Package-internal, shared by :class:`~guardrails.RedisCache` (fallback) and
:class:`~guardrails.RedisCoordinator` (coordination); nothing here is public API.
The ``redis`` package is optional: it is imported only when a client is made.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Outage", "check_url", "connect", "require", "where"]


def require(user: str) -> None:
    """Raise ``ImportError`` saying how to install the client that ``user`` needs."""
    if importlib.util.find_spec("redis") is None:
        raise ImportError(f"{user} needs the redis client: pip install 'asgi-guardrails[redis]'")


def where(url: str) -> str:
    """``host:port`` of a Redis URL (or its socket path), for logs: never the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path or "unix socket"
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def check_url(url: str) -> None:
    """Parse ``url`` as the redis client will (no I/O), so a typo fails at startup."""
    from redis.asyncio.connection import parse_url

    example = "such as 'redis://127.0.0.1:6379/0'"
    try:
        parse_url(url)
    except ValueError as exc:
        # The client's message names the bad part (port, option), never the password.
        raise ValueError(f"url is not a valid Redis URL ({exc}): give one {example}") from None
    parts = urlsplit(url)
    db = parts.path.lstrip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ValueError(
            f"url must end with a database number, e.g. /0, not /{db}: give one {example}"
        )


def connect(url: str, timeout: float) -> Any:
    """A ``redis.asyncio`` client for ``url`` (no I/O yet), every socket wait cut at ``timeout``.

    It never retries and never sends health checks by itself: a hidden retry would
    stretch a call past ``timeout``, and callers retry on their own schedule.
    """
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class Outage:
    """Leaves Redis alone for a while after a failure, and tells when an outage starts and ends.

    After :meth:`failed`, :meth:`ready` is False for ``pause`` seconds (``clock``
    seconds, monotonic): callers answer without I/O meanwhile instead of waiting on a
    server that just failed. :meth:`succeeded` ends the pause at once.
    """

    __slots__ = ("_clock", "_until", "down", "pause")

    def __init__(self, pause: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.pause = pause
        """Seconds without calls after a failure, unless :meth:`failed` says otherwise."""
        self.down = False
        """The last call failed, and none has succeeded since."""
        self._clock = clock
        self._until = 0.0

    def ready(self) -> bool:
        """May Redis be called now (no failure, or its pause is over)?"""
        return not self._until or self._clock() >= self._until

    def failed(self, pause: float | None = None) -> bool:
        """A call failed: pause ``pause`` seconds (default :attr:`pause`). True if Redis was up."""
        self._until = self._clock() + (self.pause if pause is None else pause)
        started, self.down = not self.down, True
        return started

    def succeeded(self) -> bool:
        """A call succeeded: no pause any more. True if Redis was down until now."""
        self._until = 0.0
        ended, self.down = self.down, False
        return ended
