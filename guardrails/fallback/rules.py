"""Which requests and responses the fallback may keep: plain values in, yes or no out.

It knows method, status and raw header pairs only, never ASGI (DESIGN.md, "Fallback
never leaks data"):

- request: only ``GET``/``HEAD``; a request carrying a credential header
  (:data:`CREDENTIAL_HEADERS`, plus the app's ``identity_headers``) only when the
  policy's ``cache_key`` gave a key for it (``has_cache_key=True``);
- response: only status 200, no ``Set-Cookie``, no ``Cache-Control`` ``private``,
  ``no-store`` (nor ``no-cache``, see below), never ``Vary: *``.

Decisions beyond DESIGN.md:

- A request with a credential header is cacheable only with a user key from the
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
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CREDENTIAL_HEADERS",
    "Headers",
    "request_cacheable",
    "response_cacheable",
    "vary_names",
]

Headers = Sequence[tuple[bytes, bytes]]
"""Raw ``(name, value)`` header pairs, as a request or response carries them."""

_CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
CREDENTIAL_HEADERS = frozenset(
    {
        b"authorization",
        b"proxy-authorization",
        b"cookie",
        b"x-api-key",
        b"x-auth-token",
        b"x-csrf-token",
    }
)
"""Request headers that say who is asking: such a request is never served or stored under
a shared key, only under the policy's ``cache_key``."""
_FORBIDDING = frozenset({"private", "no-store", "no-cache"})


def request_cacheable(
    method: str,
    headers: Headers,
    has_cache_key: bool,
    credentials: frozenset[bytes] = CREDENTIAL_HEADERS,
) -> bool:
    """May the response to this request be stored and replayed to the same key?

    Only ``GET`` and ``HEAD``; with a credential header (lowercase names in
    ``credentials``) only when the policy's ``cache_key`` returned a key for this
    request (pass False if it returned None).
    """
    if method not in _CACHEABLE_METHODS:
        return False
    if has_cache_key:
        return True
    return all(name.lower() not in credentials for name, _ in headers)


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
