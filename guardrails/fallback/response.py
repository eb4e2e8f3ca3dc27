"""The stored response: what a stale replay sends, and when it was made."""

from __future__ import annotations

import time
from dataclasses import dataclass

from guardrails.fallback.rules import Headers, vary_names

__all__ = ["CachedResponse"]


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A complete stored response: what a stale replay sends, and when it was made."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    """Raw ASGI header pairs, names lowercase, as the app sent them."""
    body: bytes
    stored_at: float
    """Wall-clock ``time.time()`` when the response was made, for ``Age``."""
    vary: tuple[bytes, ...] = ()
    """Lowercase header names from the response's ``Vary``."""

    @classmethod
    def build(
        cls, status: int, headers: Headers, body: bytes, *, stored_at: float | None = None
    ) -> CachedResponse:
        """A response from what the app sent, with ``vary`` read from its headers."""
        pairs = tuple(headers)
        return cls(
            status,
            pairs,
            body,
            time.time() if stored_at is None else stored_at,
            vary_names(pairs),
        )

    @property
    def size(self) -> int:
        """Approximate memory in bytes: body plus header names and values."""
        return len(self.body) + sum(len(name) + len(value) for name, value in self.headers)
