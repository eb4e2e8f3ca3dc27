"""MemoryCache: the in-process response store, an LRU with TTLs and a hard byte limit."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from guardrails.fallback.response import CachedResponse

__all__ = ["MemoryCache"]


def _positive_int(value: object, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1 ({hint}), not {value!r}")
    return value


class MemoryCache:
    """In-process response store with per-entry TTL, a hard byte limit and scan-resistant
    eviction.

    Calls never block and never do I/O: its async ``get``, ``set`` and ``delete`` (the
    :class:`~guardrails.fallback.store.ResponseStore` protocol) finish without awaiting
    anything. ``get`` and ``set`` are O(1) (amortized for evictions). The accounted size
    of an entry is its key length plus :attr:`CachedResponse.size`; the total never
    exceeds ``max_bytes``. Expired entries are misses and are dropped when met: on
    access, or while making room. TTLs use ``clock`` (monotonic seconds).

    Eviction is a segmented LRU: a new entry starts *on probation*; one that is read
    back or stored again (a page in use) moves to the *protected* segment, which holds
    at most four fifths of ``max_entries``. Room is made from probation first, so a
    flood of one-off URLs (random query strings) churns among itself and does not push
    out the pages people actually use. Not thread-safe: use it from one event loop.
    """

    __slots__ = (
        "_bytes",
        "_clock",
        "_entries",
        "_max_bytes",
        "_max_entries",
        "_max_entry_bytes",
        "_protected",
        "evictions",
        "expired",
        "hits",
        "misses",
        "too_large",
    )

    def __init__(
        self,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 2**20,
        max_entry_bytes: int = 1 * 2**20,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = _positive_int(max_entries, "max_entries", "how many responses")
        self._max_bytes = _positive_int(max_bytes, "max_bytes", "total memory, e.g. 64 * 2**20")
        self._max_entry_bytes = _positive_int(
            max_entry_bytes, "max_entry_bytes", "largest response kept, e.g. 2**20"
        )
        if max_entry_bytes > max_bytes:
            raise ValueError(
                f"max_entry_bytes ({max_entry_bytes}) must be <= max_bytes ({max_bytes}): "
                "lower max_entry_bytes or raise max_bytes"
            )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, not {clock!r}")
        self._clock = clock
        # key -> (response, expires_at, accounted size); oldest use first. _entries is
        # the probation segment, _protected the entries used more than once.
        self._entries: OrderedDict[str, tuple[CachedResponse, float, int]] = OrderedDict()
        self._protected: OrderedDict[str, tuple[CachedResponse, float, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expired = 0
        self.too_large = 0

    @property
    def max_entries(self) -> int:
        """Most entries kept (vary records count as entries)."""
        return self._max_entries

    @property
    def max_bytes(self) -> int:
        """Most accounted bytes kept, all entries together."""
        return self._max_bytes

    @property
    def max_entry_bytes(self) -> int:
        """Largest accounted size of one entry; larger responses are refused."""
        return self._max_entry_bytes

    def __len__(self) -> int:
        return len(self._entries) + len(self._protected)

    async def get(self, key: str) -> CachedResponse | None:
        """The live entry under ``key`` (now the most recently used), or None."""
        entry = self._protected.pop(key, None)
        if entry is None:
            entry = self._entries.pop(key, None)
        if entry is None:
            self.misses += 1
            return None
        if entry[1] <= self._clock():
            self._bytes -= entry[2]
            self.expired += 1
            self.misses += 1
            return None
        self._protect(key, entry)
        self.hits += 1
        return entry[0]

    def _protect(self, key: str, entry: tuple[CachedResponse, float, int]) -> None:
        protected = self._protected
        protected[key] = entry
        if len(protected) > max(1, self._max_entries * 4 // 5):
            # The least recently used protected entry goes back on probation.
            demoted, held = protected.popitem(last=False)
            self._entries[demoted] = held

    async def set(self, key: str, response: CachedResponse, ttl: float | timedelta) -> None:
        """Keep ``response`` for ``ttl`` seconds, evicting least recently used entries.

        A response too large for ``max_entry_bytes`` is refused (counted in
        ``too_large``) and leaves the store as it was. A ``ttl`` <= 0 removes ``key``.
        """
        if isinstance(ttl, timedelta):
            ttl = ttl.total_seconds()
        size = len(key) + response.size
        if size > self._max_entry_bytes:
            self.too_large += 1
            return
        old = self._protected.pop(key, None)
        if old is None:
            old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[2]
        if not ttl > 0:
            return
        entry = (response, self._clock() + ttl, size)
        if old is not None:
            self._protect(key, entry)  # stored again: a page in use
        else:
            self._entries[key] = entry
        self._bytes += size
        if self._bytes > self._max_bytes or len(self) > self._max_entries:
            self._make_room(key)

    def _make_room(self, keep: str) -> None:
        # Probation first, least recently used first; the entry just stored fits on its
        # own, so this stops before it.
        now = self._clock()
        while self._bytes > self._max_bytes or len(self) > self._max_entries:
            segment = self._entries if self._entries else self._protected
            key, (_, expires_at, size) = segment.popitem(last=False)
            if key == keep:  # the newest entry is all that is left on probation
                segment[key] = (_, expires_at, size)
                segment = self._protected
                key, (_, expires_at, size) = segment.popitem(last=False)
            self._bytes -= size
            if expires_at <= now:
                self.expired += 1
            else:
                self.evictions += 1

    async def delete(self, key: str) -> None:
        """Forget ``key``; no error if absent."""
        old = self._protected.pop(key, None)
        if old is None:
            old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[2]

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._entries.clear()
        self._protected.clear()
        self._bytes = 0

    def snapshot(self) -> dict[str, Any]:
        """Entries, bytes and limits, plus counters: hits, misses, evictions, expired, too_large.

        Counters count store lookups; a ``Vary``'d response takes two per request.
        """
        return {
            "kind": "memory",
            "entries": len(self),
            "protected": len(self._protected),
            "bytes": self._bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expired": self.expired,
            "too_large": self.too_large,
        }
