"""Reading a request body up front, within ``max_body``, before the request takes a slot.

A body arrives at the client's pace; reading it needs no database connection, so it is
read in full before a slot (or the breaker's trial) is taken, and handed to the app
from memory (:func:`read_up_front`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.types import Message, Receive, Scope

from guardrails.asgi.clients import uncancel
from guardrails.asgi.refusal import Refusal

if TYPE_CHECKING:
    from guardrails.asgi.request import GuardedRequest

__all__ = ["GONE", "TOO_LARGE", "BodyReplay", "needs_reading", "read_body", "read_up_front"]

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


async def read_up_front(request: GuardedRequest) -> Refusal | None:
    """Read ``request``'s body within its route's ``max_body`` and ``body_timeout``, and
    hand it to the app from memory; the refusal instead, if any."""
    resolved = request.resolved
    limit = resolved.max_body
    wanted = needs_reading(request.scope, limit)
    if wanted is not True:
        return wanted or None
    assert limit is not None
    receive = request.receive
    request.wait_on_client(resolved.body_timeout)
    try:
        body = await read_body(receive, limit)
    except asyncio.CancelledError:
        if not request.aborted:
            raise
        uncancel(request.task)  # the watchdog's doing: the client was too slow
        return Refusal("body_timeout", "body_timeout", 0, 408)
    finally:
        request.client_deadline = 0.0
    if isinstance(body, Refusal):
        return body
    request.receive = BodyReplay(request, body, receive)
    return None


class BodyReplay:
    """The app's ``receive`` once the body was read: the body, then the client's own."""

    __slots__ = ("body", "receive", "request")

    def __init__(self, request: GuardedRequest, body: bytes, receive: Receive) -> None:
        self.request = request
        self.body: bytes | None = body
        self.receive = receive

    async def __call__(self) -> Message:
        body = self.body
        if body is not None:
            self.body = None
            return {"type": "http.request", "body": body, "more_body": False}
        try:
            return await self.receive()
        except BaseException as exc:
            self.request.client_error = exc  # a hang-up is the client's, not the database's
            raise
