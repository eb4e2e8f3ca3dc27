"""How guardrails talks to Redis: where it is (a URL or the user's client), and pauses.

Package-internal, shared by :class:`~guardrails.RedisCache` (fallback) and
:class:`~guardrails.RedisCoordinator` (coordination); nothing here is public API.
The ``redis`` package is optional: it is imported only when a client is checked or made.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Endpoint", "Outage", "check_url", "connect", "follow_master", "require", "where"]

_CLIENTS = (
    "redis.asyncio.Redis(...), redis.asyncio.Sentinel(...).master_for(...) or "
    "redis.asyncio.RedisCluster(...)"
)


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


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a Redis is: a URL guardrails makes its own client for, or a client the user built.

    A client the user built stays the user's: guardrails never closes it, and relies on
    its own timeouts only through ``asyncio.wait_for``.
    """

    url: str | None
    """The URL given, or None for a client."""
    client: Any
    """The client given (``redis.asyncio.Redis`` or ``RedisCluster``), or None for a URL."""
    where: str
    """``host:port`` (or what names the server) for logs and snapshots: never a password."""
    cluster: bool
    """A Redis Cluster client: pub/sub is sharded, and every script's keys share a slot."""

    @classmethod
    def of(cls, target: object, user: str) -> Endpoint:
        """Check ``target`` (a URL or an asyncio client) at construction, with no I/O."""
        if isinstance(target, str):
            scheme = urlsplit(target).scheme
            if scheme not in ("redis", "rediss", "unix"):
                raise ValueError(
                    f"{user} needs a Redis URL such as 'redis://127.0.0.1:6379/0' (or "
                    f"rediss://, unix://), not one with scheme {scheme!r}; or pass a client: "
                    f"{_CLIENTS}"
                )
            require(user)
            check_url(target)
            return cls(target, None, where(target), cluster=False)
        require(user)
        return cls(None, target, _client_where(target, user), cluster=_is_cluster(target))

    @property
    def owned(self) -> bool:
        """Guardrails made the client (from the URL) and closes it."""
        return self.client is None

    @property
    def sentinel(self) -> bool:
        """A client of the master that Sentinels name: see :func:`follow_master`."""
        return self.client is not None and _follows_sentinels(self.client)

    def connect(self, timeout: float) -> Any:
        """The user's client, or a new one for the URL (no I/O yet): see :func:`connect`."""
        if self.client is not None:
            return self.client
        assert self.url is not None
        return connect(self.url, timeout)


def _follows_sentinels(client: object) -> bool:
    from redis.asyncio.sentinel import SentinelConnectionPool

    pool = getattr(client, "connection_pool", None)
    return isinstance(pool, SentinelConnectionPool) and bool(pool.is_master)


async def follow_master(client: Any) -> None:
    """Ask the Sentinels which server is the master now; redis-py then drops idle
    connections to a former one.

    After a failover the former master may take writes for seconds more, until the
    Sentinels demote it: a process still writing there would keep a budget of its own.
    """
    if _follows_sentinels(client):
        await client.connection_pool.get_master_address()


def _is_cluster(client: object) -> bool:
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def _client_where(client: object, user: str) -> str:
    """Check that ``client`` is an asyncio client, and name its server for logs."""
    import redis
    from redis.asyncio import Redis as AsyncRedis
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel
    from redis.asyncio.sentinel import SentinelConnectionPool

    if isinstance(client, AsyncCluster):
        nodes = getattr(getattr(client, "nodes_manager", None), "startup_nodes", None) or {}
        first = next(iter(nodes), "")
        return f"cluster {first}".strip()
    if isinstance(client, AsyncRedis):
        pool = client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            return f"sentinel service {pool.service_name}"
        options = pool.connection_kwargs
        if "path" in options:
            return str(options["path"])
        return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
    kind = type(client).__name__
    if isinstance(client, (redis.Redis, redis.RedisCluster)):
        raise TypeError(
            f"{user} needs an asyncio Redis client, and redis.{kind} is synchronous (it "
            f"would block the event loop): pass {_CLIENTS} instead"
        )
    if isinstance(client, (redis.Sentinel, AsyncSentinel)):
        raise TypeError(
            f"{user} needs the client of the master, not the Sentinel: pass "
            "redis.asyncio.Sentinel(...).master_for('service-name')"
        )
    raise TypeError(
        f"{user} takes a Redis URL such as 'redis://127.0.0.1:6379/0' or an asyncio "
        f"client ({_CLIENTS}), not {kind}"
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
