"""What a stale replay sends: the stored headers, minus hop-by-hop ones, marked stale."""

from __future__ import annotations

from guardrails.fallback.response import CachedResponse

__all__ = ["age_header", "stale_headers"]

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
