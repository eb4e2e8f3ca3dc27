"""Fallback responses: which responses may be kept, under which key, and where.

A route with ``cache_ttl`` or ``stale_ttl`` keeps its last good response here, so
that a refusal can replay it (marked stale) instead of answering 503. It knows plain
values only (method, path, raw header pairs, bytes), never ASGI: the middleware
decides *when* to store and replay, this package decides *whether* and *how*.

- :mod:`~guardrails.fallback.rules`: which requests and responses may be kept;
- :mod:`~guardrails.fallback.keys`: the store key of a request;
- :mod:`~guardrails.fallback.store`: the :class:`ResponseStore` protocol, and
  :func:`lookup` / :func:`remember`, which handle ``Vary``;
- :mod:`~guardrails.fallback.memory` and :mod:`~guardrails.fallback.redis`: the stores;
- :mod:`~guardrails.fallback.wire`: the bytes an external store keeps;
- :mod:`~guardrails.fallback.replay`: the headers a stale replay sends.
"""

from guardrails.fallback.keys import make_key
from guardrails.fallback.memory import MemoryCache
from guardrails.fallback.redis import RedisCache
from guardrails.fallback.replay import age_header, stale_headers
from guardrails.fallback.response import CachedResponse
from guardrails.fallback.rules import (
    CREDENTIAL_HEADERS,
    request_cacheable,
    response_cacheable,
    vary_names,
)
from guardrails.fallback.store import ResponseStore, lookup, remember
from guardrails.fallback.wire import decode_response, encode_response

__all__ = [
    "CREDENTIAL_HEADERS",
    "CachedResponse",
    "MemoryCache",
    "RedisCache",
    "ResponseStore",
    "age_header",
    "decode_response",
    "encode_response",
    "lookup",
    "make_key",
    "remember",
    "request_cacheable",
    "response_cacheable",
    "stale_headers",
    "vary_names",
]
