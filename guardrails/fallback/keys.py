"""Store keys: one request's identity, hashed, so no two different requests share a key.

A key is the sha256 of a length-prefixed encoding of (scheme, ``Host``, method, path,
raw query string, user key, the values of ``X-Forwarded-Host``, ``X-Forwarded-Proto``
and ``Forwarded``, the sorted ``Vary`` header names, and each such request header's
values in order), so no two different inputs share a key, whatever separators a path
or header contains.

Decisions beyond DESIGN.md:

- The request's scheme, ``Host`` and the proxy headers that name the host and scheme
  the client used are part of every key: an app serving several sites or tenants by
  host name never replays one host's page to another, a page rendered with links for
  ``X-Forwarded-Host: evil.example`` is never replayed to a request without it, and an
  HTTPS visitor never gets a page rendered with ``http://`` links.
- ``HEAD`` and ``GET`` have separate entries (the method is part of the key): a ``HEAD``
  is never answered from a ``GET`` entry, so the middleware never has to strip a body.
- Repeated values of one ``Vary``'d request header are keyed as a list, not joined, so
  ``a, b`` in one header and ``a`` + ``b`` in two are different variants (a miss at worst).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from guardrails.fallback.rules import Headers

__all__ = ["make_key"]


_ALWAYS = (b"forwarded", b"x-forwarded-host", b"x-forwarded-proto")
"""Request headers that change what a page says about where it lives: always keyed."""


def make_key(
    method: str,
    path: str,
    query_string: bytes,
    request_headers: Headers,
    vary: Sequence[bytes],
    user_key: str | None,
    *,
    scheme: str = "http",
) -> str:
    """The store key for a request: distinct inputs always give distinct keys.

    ``vary`` names the request headers whose values select the variant (any case, any
    order); their values count in order, an absent header differs from an empty one.
    ``user_key`` is the policy's ``cache_key(request)`` result, None when there is none.
    """
    method_b = method.encode("utf-8", "surrogateescape")
    path_b = path.encode("utf-8", "surrogateescape")
    user = b"-" if user_key is None else b"+" + user_key.encode("utf-8", "surrogateescape")
    scheme_b = scheme.encode("ascii", "replace")
    # One app may serve several sites or tenants by Host: a page of one must never be
    # replayed to another. Absent (HTTP/1.0) differs from any value.
    host = b"-"
    for name, value in request_headers:
        if name.lower() == b"host":
            host = b"+" + value.lower()
            break
    # Netstring-style fields: every part is length-prefixed, so no content can pass for
    # a separator. sha256 keeps keys short and uniform for any store.
    head = b"gr3,%d:%b,%d:%b,%d:%b,%d:%b,%d:%b,%d:%b," % (
        len(scheme_b),
        scheme_b,
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
    parts = [head]
    for wanted in _ALWAYS:
        _values(parts, wanted, request_headers)
    if not vary:
        parts.append(b"0,")
        return hashlib.sha256(b"".join(parts)).hexdigest()
    names = sorted({name.lower() for name in vary})
    parts.append(b"%d," % len(names))
    for wanted in names:
        _values(parts, wanted, request_headers)
    return hashlib.sha256(b"".join(parts)).hexdigest()


def _values(parts: list[bytes], wanted: bytes, request_headers: Headers) -> None:
    # The header's values in order; none at all differs from one empty value.
    values = [value for name, value in request_headers if name.lower() == wanted]
    parts.append(b"%d:%b,%d," % (len(wanted), wanted, len(values)))
    parts.extend(b"%d:%b," % (len(value), value) for value in values)
