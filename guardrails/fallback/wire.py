"""The bytes an external store keeps for a response: JSON metadata, then the raw body."""

from __future__ import annotations

import json
import struct

from guardrails.fallback.response import CachedResponse

__all__ = ["decode_response", "encode_response"]

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
