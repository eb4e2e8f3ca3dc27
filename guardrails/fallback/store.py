"""Where responses are kept (:class:`ResponseStore`), and how a request finds its own.

The ``Vary`` names are only known from a stored response, so a lookup takes two steps
through the same store:

1. the *base key* (``make_key`` with no ``Vary`` names) holds either the response itself,
   when it had no ``Vary``, or a small *vary record* (a ``CachedResponse`` with status 0,
   no body, and the names in ``vary``) left by the last stored response that had one;
2. for a vary record, the entry lives under ``make_key`` with those names, which includes
   the current request's values of those headers.

A request whose ``Vary``-listed header values differ computes a different key in step 2,
so it can never get the other variant; an entry is only reachable under the exact names
and values it was stored with. Several variants (say gzip and identity) live side by
side. :func:`lookup` and :func:`remember` do both steps; use them rather than the
store's raw ``get``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Protocol

from guardrails.fallback.keys import make_key
from guardrails.fallback.response import CachedResponse
from guardrails.fallback.rules import Headers

__all__ = ["ResponseStore", "lookup", "remember"]

_VARY_RECORD = 0
"""Status of the marker left under a base key when the response had ``Vary``."""


class ResponseStore(Protocol):
    """Where responses are kept for the fallback: :class:`MemoryCache` or :class:`RedisCache`.

    Keys come from :func:`make_key`; go through :func:`lookup` and :func:`remember`,
    which handle ``Vary``. A store must never return an entry past its ``ttl``.
    """

    async def get(self, key: str) -> CachedResponse | None:
        """The live entry under ``key``, or None (missing or expired)."""
        ...

    async def set(self, key: str, response: CachedResponse, ttl: float) -> None:
        """Keep ``response`` under ``key`` for ``ttl`` seconds (the store may refuse it)."""
        ...

    async def delete(self, key: str) -> None:
        """Forget ``key``; no error if absent."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Counters for health and metrics: entries, bytes, hits, misses, evictions."""
        ...


def _vary_record(response: CachedResponse) -> CachedResponse:
    return CachedResponse(_VARY_RECORD, (), b"", response.stored_at, response.vary)


def _check_storable(response: CachedResponse) -> None:
    if response.status == _VARY_RECORD:
        raise ValueError("status 0 is reserved for guardrails' vary records")


async def lookup(
    store: ResponseStore,
    method: str,
    path: str,
    query_string: bytes,
    request_headers: Headers,
    user_key: str | None,
    *,
    scheme: str = "http",
) -> CachedResponse | None:
    """The stored response for this request, following a ``Vary`` record if there is one."""
    base = make_key(method, path, query_string, request_headers, (), user_key, scheme=scheme)
    found = await store.get(base)
    if found is None or found.status != _VARY_RECORD:
        return found
    return await store.get(
        make_key(method, path, query_string, request_headers, found.vary, user_key, scheme=scheme)
    )


async def remember(
    store: ResponseStore,
    method: str,
    path: str,
    query_string: bytes,
    request_headers: Headers,
    user_key: str | None,
    response: CachedResponse,
    ttl: float | timedelta,
    *,
    scheme: str = "http",
) -> None:
    """Store ``response`` for ``ttl`` seconds as the answer to this request.

    Check :func:`request_cacheable` and :func:`response_cacheable` first.
    """
    _check_storable(response)
    if isinstance(ttl, timedelta):
        ttl = ttl.total_seconds()
    base = make_key(method, path, query_string, request_headers, (), user_key, scheme=scheme)
    if not response.vary:
        await store.set(base, response, ttl)
        return
    await store.set(base, _vary_record(response), ttl)
    await store.set(
        make_key(
            method, path, query_string, request_headers, response.vary, user_key, scheme=scheme
        ),
        response,
        ttl,
    )
