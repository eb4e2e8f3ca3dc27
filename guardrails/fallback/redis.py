"""RedisCache: the response store shared by every process, kept in Redis."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from guardrails._redis import Endpoint, Outage
from guardrails.fallback.response import CachedResponse
from guardrails.fallback.wire import decode_response, encode_response
from guardrails.limiter_checks import seconds

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = ["RedisCache"]

logger = logging.getLogger("guardrails")


def _positive_int(value: object, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1 ({hint}), not {value!r}")
    return value


class RedisCache:
    """Response store in Redis, shared by every process: the fallback survives restarts.

    Entries expire in Redis itself (``PX``), so nothing outlives its ``ttl``; values are
    JSON metadata plus the raw body, never pickle. The same cacheability rules apply as
    for :class:`MemoryCache` (they live in :mod:`guardrails.fallback.rules`, not in a store).

    Redis trouble never reaches a request: each call is cut off after ``timeout``
    seconds, and on any error a lookup is a miss and a write is dropped. The first error
    is logged once; then Redis is left alone for ``retry_interval`` seconds (calls answer
    at once without I/O) and tried again. Use it from one event loop.

    ``url`` is a Redis URL, or a ``redis.asyncio`` client of your own: ``Redis(...)``,
    ``Sentinel(...).master_for("name")`` or ``RedisCluster(...)`` (each entry is one key,
    so any slot will do). A client you pass stays yours: it is never closed here.
    """

    def __init__(
        self,
        url: str | Redis | RedisCluster,
        *,
        prefix: str = "guardrails:cache:",
        max_entry_bytes: int = 1 * 2**20,
        timeout: float | timedelta = 0.1,
        retry_interval: float | timedelta = 1.0,
    ) -> None:
        self._endpoint = Endpoint.of(url, "RedisCache")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(
                f"prefix must be a non-empty string such as 'myapp:cache:', not {prefix!r}"
            )
        self.url = self._endpoint.url
        """The Redis URL given, or None for a client."""
        self.prefix = prefix
        self._where = self._endpoint.where
        self._max_entry_bytes = _positive_int(
            max_entry_bytes, "max_entry_bytes", "largest response kept, e.g. 2**20"
        )
        self.timeout = seconds(timeout, "timeout")
        if not self.timeout > 0:
            raise ValueError("timeout must be a positive number of seconds, e.g. 0.1")
        self.retry_interval = seconds(retry_interval, "retry_interval")
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outage = Outage(self.retry_interval)
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.skipped = 0
        self.too_large = 0
        self.damaged = 0
        self.last_error: str | None = None

    @property
    def max_entry_bytes(self) -> int:
        """Largest accounted size of one entry; larger responses are not stored."""
        return self._max_entry_bytes

    def _redis(self) -> Any:
        if not self._endpoint.owned:
            return self._endpoint.client
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            if self._client is not None:
                self._drop_client(self._client, self._loop)
            self._client = self._endpoint.connect(self.timeout)
            self._loop = loop
        return self._client

    def _available(self) -> bool:
        if self._outage.ready():
            return True
        self.skipped += 1
        return False

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = type(exc).__name__
        if self._outage.failed():
            logger.warning(
                "response store: Redis at %s failed (%s); lookups miss and writes are dropped "
                "until it answers",
                self._where,
                type(exc).__name__,
            )

    def _succeeded(self) -> None:
        if self._outage.succeeded():
            logger.info("response store: Redis at %s answers again", self._where)

    async def get(self, key: str) -> CachedResponse | None:
        """The live entry under ``key``, or None: missing, expired, damaged or Redis down."""
        if not self._available():
            self.misses += 1
            return None
        try:
            data = await asyncio.wait_for(self._redis().get(self.prefix + key), self.timeout)
        except Exception as exc:
            self._failed(exc)
            self.misses += 1
            return None
        self._succeeded()
        if data is None:
            self.misses += 1
            return None
        try:
            found = decode_response(data)
        except ValueError:
            self.damaged += 1
            self.misses += 1
            return None
        self.hits += 1
        return found

    async def set(self, key: str, response: CachedResponse, ttl: float | timedelta) -> None:
        """Keep ``response`` for ``ttl`` seconds (``PX``); dropped if too large or Redis is down.

        A ``ttl`` <= 0 removes ``key``.
        """
        if isinstance(ttl, timedelta):
            ttl = ttl.total_seconds()
        if not ttl > 0:
            await self.delete(key)
            return
        if len(key) + response.size > self._max_entry_bytes:
            self.too_large += 1
            return
        if not self._available():
            return
        value = encode_response(response)
        try:
            await asyncio.wait_for(
                self._redis().set(self.prefix + key, value, px=max(1, int(ttl * 1000))),
                self.timeout,
            )
        except Exception as exc:
            self._failed(exc)
            return
        self._succeeded()

    async def delete(self, key: str) -> None:
        """Forget ``key``; no error if absent or if Redis is down."""
        if not self._available():
            return
        try:
            await asyncio.wait_for(self._redis().delete(self.prefix + key), self.timeout)
        except Exception as exc:
            self._failed(exc)
            return
        self._succeeded()

    @staticmethod
    def _drop_client(client: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        """Close a client left behind by another event loop, without awaiting it here."""
        # Its connections belong to that loop: awaiting them on ours would fail. A loop
        # still running (another thread) closes them itself, as on shutdown; a stopped or
        # closed one never runs again, so the pool just lets go of its connections and
        # their sockets close when collected (nothing could await a cleaner close).
        if loop is not None and loop.is_running() and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)
                return
            except RuntimeError:  # it closed meanwhile
                pass
        client.connection_pool.reset()

    async def aclose(self) -> None:
        """Close the connections to Redis guardrails opened (on shutdown); never the user's."""
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception as exc:  # shutting down: nothing left to protect
                logger.debug("response store: closing Redis failed: %r", exc)

    def snapshot(self) -> dict[str, Any]:
        """Where it is, whether it answers, and counters: hits, misses, errors, too_large."""
        return {
            "kind": "redis",
            "redis": self._where,
            "available": not self._outage.down,
            "max_entry_bytes": self.max_entry_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "errors": self.errors,
            "skipped": self.skipped,
            "too_large": self.too_large,
            "damaged": self.damaged,
            "last_error": self.last_error,
        }
