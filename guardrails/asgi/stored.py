"""The ASGI side of the fallback: look a request up in the response store, copy a
cacheable response as it goes out, and replay a stored one (fresh or marked stale).
"""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.types import Message, Scope, Send

from guardrails import fallback
from guardrails.fallback import CachedResponse, ResponseStore
from guardrails.policy import Policy

__all__ = ["CachePlan", "Capture", "replay"]

logger = logging.getLogger("guardrails")

_DEFAULT_ENTRY_LIMIT = 1 << 20


def _warn_once(warned: set[str], route: str, what: str, exc: BaseException | None) -> None:
    # Once per route: a broken callback fails on every request to it.
    if exc is not None:
        logger.debug("cache_key of %s failed", route, exc_info=exc)
    if route not in warned:
        warned.add(route)
        logger.warning("cache_key of %s %s; its requests are not cached", route, what)


class CachePlan:
    """How one request reads and writes the response store (only for caching routes)."""

    __slots__ = (
        "headers",
        "limit",
        "method",
        "path",
        "policy",
        "query",
        "scheme",
        "store",
        "user_key",
    )

    def __init__(
        self, store: ResponseStore, scope: Scope, policy: Policy, user_key: str | None
    ) -> None:
        self.store = store
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: bytes = scope.get("query_string", b"")
        self.headers: list[tuple[bytes, bytes]] = scope["headers"]
        self.scheme: str = scope.get("scheme", "http")
        self.policy = policy
        self.user_key = user_key
        self.limit: int = getattr(store, "max_entry_bytes", _DEFAULT_ENTRY_LIMIT)
        """Largest body copied for storing; a bigger one passes through uncopied."""

    @classmethod
    def make(
        cls,
        scope: Scope,
        route: str,
        policy: Policy,
        store: ResponseStore,
        credentials: frozenset[bytes],
        warned: set[str],
    ) -> CachePlan | None:
        """The plan for a request, or None when it may not be cached or served a copy.

        A ``cache_key`` that fails or returns something else than a str or None is
        logged once per route (in ``warned``) and the request goes on uncached.
        """
        user_key = None
        if policy.cache_key is not None:
            try:
                user_key = policy.cache_key(Request(scope))
            except Exception as exc:
                _warn_once(warned, route, f"raised {type(exc).__name__}", exc)
                return None
            if user_key is not None and not isinstance(user_key, str):
                _warn_once(warned, route, f"returned {type(user_key).__name__}, not a str", None)
                return None
        # A request that says who is asking (``credentials``: header names) is served and
        # stored only under the policy's cache_key, never under a shared key.
        if not fallback.request_cacheable(
            scope["method"], scope["headers"], user_key is not None, credentials
        ):
            return None
        return cls(store, scope, policy, user_key)

    async def lookup(self, max_age: float | None) -> CachedResponse | None:
        """The stored response if it is at most ``max_age`` seconds old."""
        if max_age is None:
            return None
        found = await fallback.lookup(
            self.store,
            self.method,
            self.path,
            self.query,
            self.headers,
            self.user_key,
            scheme=self.scheme,
        )
        if found is None or time.time() - found.stored_at > max_age:
            return None
        return found

    def capture(self) -> Capture | None:
        """A copier for the response, for GET and HEAD only."""
        return Capture(self) if self.method in ("GET", "HEAD") else None

    async def remember(self, capture: Capture) -> None:
        """Store the copied response for ``max(cache_ttl, stale_ttl)`` seconds."""
        policy = self.policy
        ttl = max(policy.cache_ttl or 0.0, policy.stale_ttl or 0.0)
        response = CachedResponse.build(capture.status, capture.headers, b"".join(capture.body))
        await fallback.remember(
            self.store,
            self.method,
            self.path,
            self.query,
            self.headers,
            self.user_key,
            response,
            ttl,
            scheme=self.scheme,
        )


class Capture:
    """Copies a cacheable response as it goes out, without delaying or altering it."""

    __slots__ = ("body", "headers", "plan", "size", "status")

    def __init__(self, plan: CachePlan) -> None:
        self.plan = plan
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0

    async def copy(self, kind: str, message: Message) -> bool:
        """Copy one sent message; False once the response turned out not cacheable."""
        if kind == "http.response.start":
            headers = list(message.get("headers", ()))
            if fallback.response_cacheable(message["status"], headers):
                self.status = message["status"]
                self.headers = headers
                return True
        elif kind == "http.response.body":
            body: bytes = message.get("body", b"")
            self.size += len(body)
            if self.size <= self.plan.limit:
                self.body.append(body)
                if not message.get("more_body", False):
                    await self.plan.remember(self)
                    return False
                return True
        return False  # not cacheable, too big, or sent as a file: pass it through


async def replay(send: Send, response: CachedResponse, marker: bytes) -> None:
    """Send a stored response, marked ``X-Guardrails: hit`` or ``stale`` (with ``Age``)."""
    headers = fallback.stale_headers(response, time.time())
    if marker != b"stale":
        headers[-1] = (b"x-guardrails", marker)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
