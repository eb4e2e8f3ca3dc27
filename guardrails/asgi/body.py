"""Reading a request body up front, within ``max_body``, before the request takes a slot.

A body arrives at the client's pace; reading it needs no database connection, so it is
read in full before a slot (or the breaker's trial) is taken, and handed to the app
from memory.
"""

from __future__ import annotations

from starlette.types import Receive, Scope

from guardrails.asgi.refusal import Refusal

__all__ = ["GONE", "TOO_LARGE", "needs_reading", "read_body"]

TOO_LARGE = Refusal("body_too_large", "body_too_large", 0, 413)
GONE = Refusal("", "client_gone", 0)
"""The client went away while sending: there is nobody to answer."""

_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def needs_reading(scope: Scope, limit: int | None) -> Refusal | bool:
    """Whether to read this request's body first; :data:`TOO_LARGE` if it says it is."""
    if limit is None:
        return False  # the route streams its uploads itself
    announced = scope["method"] not in _SAFE
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit:
                    return TOO_LARGE
            except ValueError:
                pass
            announced = announced or value != b"0"
        elif name == b"transfer-encoding":
            announced = True
    return announced


async def read_body(receive: Receive, limit: int) -> bytes | Refusal:
    """The whole body, or :data:`TOO_LARGE` past ``limit`` bytes, or :data:`GONE`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return GONE
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return TOO_LARGE
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
