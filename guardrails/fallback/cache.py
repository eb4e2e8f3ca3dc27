"""Response stores for the stale fallback, and the rules that decide what may be stored.

It knows plain values only (method, path, raw header pairs, bytes), never ASGI: the
middleware decides *when* to store and replay, this module decides *whether* and *how*.

Cacheability (DESIGN.md, "Fallback never leaks data"):

- request: only ``GET``/``HEAD``; a request carrying ``Authorization`` or ``Cookie`` only
  when the policy's ``cache_key`` gave a key for it (``has_cache_key=True``);
- response: only status 200, no ``Set-Cookie``, no ``Cache-Control`` ``private``,
  ``no-store`` (nor ``no-cache``, see below), never ``Vary: *``.

Keys and ``Vary``. A key is the sha256 of a length-prefixed encoding of (``Host``, method,
path, raw query string, user key, the sorted ``Vary`` header names, and each such request header's
values in order), so no two different inputs share a key, whatever separators a path or
header contains. The ``Vary`` names are only known from a stored response, so a lookup
takes two steps through the same store:

1. the *base key* (``make_key`` with no ``Vary`` names) holds either the response itself,
   when it had no ``Vary``, or a small *vary record* (a ``CachedResponse`` with status 0,
   no body, and the names in ``vary``) left by the last stored response that had one;
2. for a vary record, the entry lives under ``make_key`` with those names, which includes
   the current request's values of those headers.

A request whose ``Vary``-listed header values differ computes a different key in step 2,
so it can never get the other variant; an entry is only reachable under the exact names
and values it was stored with. Several variants (say gzip and identity) live side by
side. :func:`lookup` and :func:`remember` (and their ``_nowait`` twins for
:class:`MemoryCache`) do both steps; use them rather than the store's raw ``get``.

Decisions beyond DESIGN.md:

- The request's ``Host`` is part of every key: an app serving several sites or tenants
  by host name never replays one host's page to another.
- ``HEAD`` and ``GET`` have separate entries (the method is part of the key): a ``HEAD``
  is never answered from a ``GET`` entry, so the middleware never has to strip a body.
- A request with ``Authorization``/``Cookie`` is cacheable only with a user key from the
  policy's ``cache_key``; that key is the only thing separating users (the credentials
  themselves are not mixed into the key), so it must identify whoever may see the data.
- ``Cache-Control: no-cache`` (bare or with a field list) is not cacheable: it says no
  reuse without the origin's say-so, and the fallback runs exactly when the origin cannot
  answer. ``private="..."`` with a field list is refused like bare ``private``.
- Freshness directives (``max-age``, ``max-age=0``, ``s-maxage``, ``must-revalidate``,
  ``Expires``) are ignored: how long a response may be replayed is the route's
  ``stale_ttl``, chosen by the app's owner, and a replay is marked ``X-Guardrails: stale``
  with ``Age``.
- Statuses other than 200 (203, 204, 301, 404, ...) are never stored, as DESIGN.md says.
- Request ``Cache-Control`` (``no-cache`` from a hard reload, ``no-store``) is ignored:
  fallback is the server's own decision, and privacy is decided by the rules above.
- Repeated values of one ``Vary``'d request header are keyed as a list, not joined, so
  ``a, b`` in one header and ``a`` + ``b`` in two are different variants (a miss at worst).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from guardrails._redis import Outage, connect, require, where
from guardrails.limiter import seconds

__all__ = [
    "CachedResponse",
    "MemoryCache",
    "RedisCache",
    "ResponseStore",
    "age_header",
    "lookup",
    "lookup_nowait",
    "make_key",
    "remember",
    "remember_nowait",
    "request_cacheable",
    "response_cacheable",
    "stale_headers",
    "vary_names",
]

Headers = Sequence[tuple[bytes, bytes]]

logger = logging.getLogger("guardrails")

_VARY_RECORD = 0
"""Status of the marker left under a base key when the response had ``Vary``."""
_CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
_CREDENTIALS = frozenset({b"authorization", b"cookie"})
_FORBIDDING = frozenset({"private", "no-store", "no-cache"})
_NOT_REPLAYED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"age",
        b"x-guardrails",
    }
)
_STALE_MARK = (b"x-guardrails", b"stale")


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


def _positive_int(value: object, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1 ({hint}), not {value!r}")
    return value


class MemoryCache:
    """In-process LRU response store with per-entry TTL and a hard byte limit.

    Calls never block and never do I/O: the async methods just call :meth:`get_nowait`
    and friends, which the middleware may use directly. ``get`` and ``set`` are O(1)
    (amortized for evictions). The accounted size of an entry is its key length plus
    :attr:`CachedResponse.size`; the total never exceeds ``max_bytes``. Expired entries
    are misses and are dropped when met: on access, or at the LRU end while making room.
    TTLs use ``clock`` (monotonic seconds). Not thread-safe: use it from one event loop.
    """

    __slots__ = (
        "_bytes",
        "_clock",
        "_entries",
        "_max_bytes",
        "_max_entries",
        "_max_entry_bytes",
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
        # key -> (response, expires_at, accounted size); oldest use first.
        self._entries: OrderedDict[str, tuple[CachedResponse, float, int]] = OrderedDict()
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
        return len(self._entries)

    def get_nowait(self, key: str) -> CachedResponse | None:
        """The live entry under ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry[1] <= self._clock():
            del self._entries[key]
            self._bytes -= entry[2]
            self.expired += 1
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def set_nowait(self, key: str, response: CachedResponse, ttl: float | timedelta) -> None:
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
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self._bytes -= old[2]
        if not ttl > 0:
            return
        entries[key] = (response, self._clock() + ttl, size)
        self._bytes += size
        if self._bytes > self._max_bytes or len(entries) > self._max_entries:
            self._make_room()

    def _make_room(self) -> None:
        # The new entry is the most recent and fits on its own, so this stops before it.
        entries = self._entries
        now = self._clock()
        while self._bytes > self._max_bytes or len(entries) > self._max_entries:
            _, (_, expires_at, size) = entries.popitem(last=False)
            self._bytes -= size
            if expires_at <= now:
                self.expired += 1
            else:
                self.evictions += 1

    def delete_nowait(self, key: str) -> None:
        """Forget ``key``; no error if absent."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[2]

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._entries.clear()
        self._bytes = 0

    async def get(self, key: str) -> CachedResponse | None:
        """:meth:`get_nowait`, for the :class:`ResponseStore` protocol."""
        return self.get_nowait(key)

    async def set(self, key: str, response: CachedResponse, ttl: float | timedelta) -> None:
        """:meth:`set_nowait`, for the :class:`ResponseStore` protocol."""
        self.set_nowait(key, response, ttl)

    async def delete(self, key: str) -> None:
        """:meth:`delete_nowait`, for the :class:`ResponseStore` protocol."""
        self.delete_nowait(key)

    def snapshot(self) -> dict[str, Any]:
        """Entries, bytes and limits, plus counters: hits, misses, evictions, expired, too_large.

        Counters count store lookups; a ``Vary``'d response takes two per request.
        """
        return {
            "kind": "memory",
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expired": self.expired,
            "too_large": self.too_large,
        }


_MAGIC = b"gr1"
_META_LENGTH = struct.Struct(">I")


def encode_response(response: CachedResponse) -> bytes:
    """``response`` as bytes for an external store: JSON metadata, then the raw body.

    Header bytes travel as latin-1 text, which maps each byte to one character and back.
    No pickle: reading an entry never runs code, whoever wrote it.
    """
    meta = json.dumps(
        {
            "status": response.status,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in response.headers],
            "stored_at": response.stored_at,
            "vary": [name.decode("latin-1") for name in response.vary],
        },
        separators=(",", ":"),
    ).encode("ascii")
    return _MAGIC + _META_LENGTH.pack(len(meta)) + meta + response.body


def decode_response(data: bytes) -> CachedResponse:
    """The response :func:`encode_response` made; ``ValueError`` for anything else."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _META_LENGTH.size:
        raise ValueError("not a guardrails response entry")
    start = len(_MAGIC) + _META_LENGTH.size
    (length,) = _META_LENGTH.unpack_from(data, len(_MAGIC))
    try:
        meta = json.loads(data[start : start + length])
        status = meta["status"]
        stored_at = meta["stored_at"]
        headers = tuple(
            (name.encode("latin-1"), value.encode("latin-1")) for name, value in meta["headers"]
        )
        vary = tuple(name.encode("latin-1") for name in meta["vary"])
    except (KeyError, TypeError, AttributeError, UnicodeError, json.JSONDecodeError) as exc:
        raise ValueError("damaged guardrails response entry") from exc
    if (
        isinstance(status, bool)
        or not isinstance(status, int)
        or isinstance(stored_at, bool)
        or not isinstance(stored_at, int | float)
    ):
        raise ValueError("damaged guardrails response entry")
    return CachedResponse(status, headers, data[start + length :], float(stored_at), vary)


class RedisCache:
    """Response store in Redis, shared by every process: the fallback survives restarts.

    Entries expire in Redis itself (``PX``), so nothing outlives its ``ttl``; values are
    JSON metadata plus the raw body, never pickle. The same cacheability rules apply as
    for :class:`MemoryCache` (they live in this module, not in the store).

    Redis trouble never reaches a request: each call is cut off after ``timeout``
    seconds, and on any error a lookup is a miss and a write is dropped. The first error
    is logged once; then Redis is left alone for ``retry_interval`` seconds (calls answer
    at once without I/O) and tried again. Use it from one event loop.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "guardrails:cache:",
        max_entry_bytes: int = 1 * 2**20,
        timeout: float | timedelta = 0.1,
        retry_interval: float | timedelta = 1.0,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "url must be a Redis URL such as 'redis://127.0.0.1:6379/0' (or rediss://, unix://)"
            )
        require("RedisCache")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(
                f"prefix must be a non-empty string such as 'myapp:cache:', not {prefix!r}"
            )
        self.url = url
        self.prefix = prefix
        self._where = where(url)
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
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            if self._client is not None:
                self._drop_client(self._client, self._loop)
            self._client = connect(self.url, self.timeout)
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
        """Close the connections to Redis (on shutdown)."""
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


def request_cacheable(method: str, headers: Headers, has_cache_key: bool) -> bool:
    """May the response to this request be stored and replayed to the same key?

    Only ``GET`` and ``HEAD``; with ``Authorization`` or ``Cookie`` only when the policy's
    ``cache_key`` returned a key for this request (pass False if it returned None).
    """
    if method not in _CACHEABLE_METHODS:
        return False
    if has_cache_key:
        return True
    return all(name.lower() not in _CREDENTIALS for name, _ in headers)


def _directive_names(value: bytes) -> list[str]:
    text = value.decode("latin-1")
    if '"' not in text:
        return [part.partition("=")[0].strip().lower() for part in text.split(",")]
    # Quoted values may hold commas (private="set-cookie, x-id"): scan past them.
    names, i, n = [], 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in ",=":
            j += 1
        names.append(text[i:j].strip().lower())
        if j < n and text[j] == "=":
            j += 1
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == '"':
                j += 1
                while j < n and text[j] != '"':
                    j += 2 if text[j] == "\\" else 1
            while j < n and text[j] != ",":
                j += 1
        i = j + 1
    return names


def vary_names(headers: Headers) -> tuple[bytes, ...]:
    """Lowercase header names listed in the response's ``Vary`` headers, first seen first."""
    names: list[bytes] = []
    for name, value in headers:
        if name.lower() == b"vary":
            for part in value.split(b","):
                token = part.strip().lower()
                if token and token not in names:
                    names.append(token)
    return tuple(names)


def response_cacheable(status: int, headers: Headers) -> bool:
    """May this response be stored for the fallback?

    Only status 200; never with ``Set-Cookie``, ``Vary: *``, or ``Cache-Control``
    ``private``, ``no-store`` or ``no-cache`` (any case, with or without a value).
    """
    if status != 200:
        return False
    for name, value in headers:
        name = name.lower()
        if name == b"set-cookie":
            return False
        if name == b"cache-control":
            if not _FORBIDDING.isdisjoint(_directive_names(value)):
                return False
        elif name == b"vary" and b"*" in (part.strip() for part in value.split(b",")):
            return False
    return True


def make_key(
    method: str,
    path: str,
    query_string: bytes,
    request_headers: Headers,
    vary: Sequence[bytes],
    user_key: str | None,
) -> str:
    """The store key for a request: distinct inputs always give distinct keys.

    ``vary`` names the request headers whose values select the variant (any case, any
    order); their values count in order, an absent header differs from an empty one.
    ``user_key`` is the policy's ``cache_key(request)`` result, None when there is none.
    """
    method_b = method.encode("utf-8", "surrogateescape")
    path_b = path.encode("utf-8", "surrogateescape")
    user = b"-" if user_key is None else b"+" + user_key.encode("utf-8", "surrogateescape")
    # One app may serve several sites or tenants by Host: a page of one must never be
    # replayed to another. Absent (HTTP/1.0) differs from any value.
    host = b"-"
    for name, value in request_headers:
        if name.lower() == b"host":
            host = b"+" + value.lower()
            break
    # Netstring-style fields: every part is length-prefixed, so no content can pass for
    # a separator. sha256 keeps keys short and uniform for any store.
    head = b"gr2,%d:%b,%d:%b,%d:%b,%d:%b,%d:%b," % (
        len(host),
        host,
        len(method_b),
        method_b,
        len(path_b),
        path_b,
        len(query_string),
        query_string,
        len(user),
        user,
    )
    if not vary:
        return hashlib.sha256(head + b"0,").hexdigest()
    names = sorted({name.lower() for name in vary})
    parts = [head, b"%d," % len(names)]
    for wanted in names:
        values = [value for name, value in request_headers if name.lower() == wanted]
        parts.append(b"%d:%b,%d," % (len(wanted), wanted, len(values)))
        parts.extend(b"%d:%b," % (len(value), value) for value in values)
    return hashlib.sha256(b"".join(parts)).hexdigest()


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
) -> CachedResponse | None:
    """The stored response for this request, following a ``Vary`` record if there is one."""
    found = await store.get(make_key(method, path, query_string, request_headers, (), user_key))
    if found is None or found.status != _VARY_RECORD:
        return found
    return await store.get(
        make_key(method, path, query_string, request_headers, found.vary, user_key)
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
) -> None:
    """Store ``response`` for ``ttl`` seconds as the answer to this request.

    Check :func:`request_cacheable` and :func:`response_cacheable` first.
    """
    _check_storable(response)
    if isinstance(ttl, timedelta):
        ttl = ttl.total_seconds()
    base = make_key(method, path, query_string, request_headers, (), user_key)
    if not response.vary:
        await store.set(base, response, ttl)
        return
    await store.set(base, _vary_record(response), ttl)
    await store.set(
        make_key(method, path, query_string, request_headers, response.vary, user_key),
        response,
        ttl,
    )


def lookup_nowait(
    cache: MemoryCache,
    method: str,
    path: str,
    query_string: bytes,
    request_headers: Headers,
    user_key: str | None,
) -> CachedResponse | None:
    """:func:`lookup` without a coroutine, for :class:`MemoryCache` on the hot path."""
    found = cache.get_nowait(make_key(method, path, query_string, request_headers, (), user_key))
    if found is None or found.status != _VARY_RECORD:
        return found
    return cache.get_nowait(
        make_key(method, path, query_string, request_headers, found.vary, user_key)
    )


def remember_nowait(
    cache: MemoryCache,
    method: str,
    path: str,
    query_string: bytes,
    request_headers: Headers,
    user_key: str | None,
    response: CachedResponse,
    ttl: float | timedelta,
) -> None:
    """:func:`remember` without a coroutine, for :class:`MemoryCache`."""
    _check_storable(response)
    base = make_key(method, path, query_string, request_headers, (), user_key)
    if not response.vary:
        cache.set_nowait(base, response, ttl)
        return
    cache.set_nowait(base, _vary_record(response), ttl)
    cache.set_nowait(
        make_key(method, path, query_string, request_headers, response.vary, user_key),
        response,
        ttl,
    )


def age_header(response: CachedResponse, now: float) -> bytes:
    """``Age`` value for a replay at wall-clock ``now``: whole seconds, never negative."""
    age = now - response.stored_at
    return b"%d" % int(age) if age > 0 else b"0"


def stale_headers(response: CachedResponse, now: float) -> list[tuple[bytes, bytes]]:
    """Headers for a stale replay: the stored ones without hop-by-hop, ``Date`` and
    ``Age`` (and whatever ``Connection`` names), plus ``Age`` and ``X-Guardrails: stale``.
    """
    drop = _NOT_REPLAYED
    for name, value in response.headers:
        if name.lower() == b"connection":
            drop = drop | {token.strip().lower() for token in value.split(b",")}
    headers = [pair for pair in response.headers if pair[0].lower() not in drop]
    headers.append((b"age", age_header(response, now)))
    headers.append(_STALE_MARK)
    return headers
