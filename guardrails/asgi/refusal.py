"""Refusals: the small 503 (or the app's own) that guardrails answers instead of running
a request, in JSON or, for browsers, a friendly HTML page.

Deliberately tiny and fixed: no exception text, driver message or DSN can get in, and
every refusal carries an integer ``Retry-After``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import NamedTuple

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Scope, Send

from guardrails.errors import Shed
from guardrails.outbound.errors import OriginUnavailable

__all__ = [
    "Refusal",
    "Refusals",
    "error_response",
    "html_error_response",
    "prefers_html",
    "refusal_for",
    "shed_behind",
]

logger = logging.getLogger("guardrails")

Headers = list[tuple[bytes, bytes]]
ErrorResponseFactory = Callable[[Request, str, int], "Response | None"]


class Refusal(NamedTuple):
    """Why a request is not run: what the client sees, what telemetry counts."""

    error: str
    """The client-facing error: ``overloaded``, ``unavailable``, ``read_only``, ``timeout``;
    for the client's own fault ``body_too_large`` (413) or ``body_timeout`` (408)."""
    reason: str
    """What telemetry counts it as (``queue_full``, ``breaker_open``, ``outage``...)."""
    retry_after: int
    """Whole seconds the client should wait (503 only)."""
    status: int = 503
    """413 and 408 are the client's doing: never a stale copy, never the app's factory."""


def error_response(error: str, retry_after: int) -> tuple[Headers, bytes]:
    """Headers and body of a 503 that tells the client what happened and when to retry."""
    body = json.dumps({"error": error, "retry_after": retry_after}).encode()
    return _headers(b"application/json", body, retry_after), body


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 32em; margin: 4em auto">
<h1>{title}</h1><p>{text} Please try again in {retry_after} {unit}.</p></body></html>
"""
_HTML_TEXT = {
    "read_only": ("Read-only for a moment", "Changes cannot be saved right now."),
    "unavailable": ("Temporarily unavailable", "We cannot reach our database right now."),
    "timeout": ("Taking too long", "This page took too long to prepare."),
}


def html_error_response(error: str, retry_after: int) -> tuple[Headers, bytes]:
    """A small friendly HTML page for browsers: busy, try again in N seconds."""
    title, text = _HTML_TEXT.get(error, ("Temporarily busy", "We are busy right now."))
    unit = "second" if retry_after == 1 else "seconds"
    body = _HTML.format(title=title, text=text, retry_after=retry_after, unit=unit).encode()
    return _headers(b"text/html; charset=utf-8", body, retry_after), body


def _headers(content_type: bytes, body: bytes, retry_after: int) -> Headers:
    return [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
        (b"cache-control", b"no-store"),
    ]


def prefers_html(scope: Scope) -> bool:
    """Whether the client's Accept ranks text/html above application/json."""
    accept = b""
    for name, value in scope["headers"]:
        if name == b"accept":
            accept = value
            break
    if b"text/html" not in accept:
        return False
    html = json_q = 0.0
    for item in accept.decode("latin-1").split(","):
        media, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media == "text/html":
            html = max(html, q)
        elif media == "application/json":
            json_q = max(json_q, q)
    return html > json_q


class Refusals:
    """Sends refusals for one middleware: the app's factory if it has one, else ours."""

    def __init__(self, factory: ErrorResponseFactory | None) -> None:
        self.factory = factory
        self._built: dict[tuple[str, int], tuple[Headers, bytes]] = {}
        self._warned = False

    async def send(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        """Send the answer for ``refusal``: the 503 (or 413, 408) the client can act on."""
        error, retry_after = refusal.error, refusal.retry_after
        if refusal.status != 503:
            body = json.dumps({"error": error}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            await send(
                {"type": "http.response.start", "status": refusal.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": body})
            return
        if self.factory is not None:
            custom = self._custom(scope, error, retry_after)
            if custom is not None:
                await custom(scope, _no_body, send)
                return
        if prefers_html(scope):
            headers, body = html_error_response(error, retry_after)
        else:
            key = (error, retry_after)
            built = self._built.get(key)
            if built is None:
                built = self._built[key] = error_response(error, retry_after)
            headers, body = built
        # A copy: a CORS layer adds its headers to the list it is sent.
        await send({"type": "http.response.start", "status": 503, "headers": list(headers)})
        await send({"type": "http.response.body", "body": body})

    def _custom(self, scope: Scope, error: str, retry_after: int) -> Response | None:
        assert self.factory is not None
        try:
            response = self.factory(Request(scope), error, retry_after)
        except Exception as exc:
            self._warn(f"raised {type(exc).__name__}", exc)
            return None
        if response is None:
            return None
        if not isinstance(response, Response):
            self._warn(f"returned {type(response).__name__}, not a starlette Response", None)
            return None
        # Whatever the factory built, the client always gets an integer Retry-After.
        response.headers["retry-after"] = str(retry_after)
        return response

    def _warn(self, what: str, exc: BaseException | None) -> None:
        # Once: a broken factory fails on every refusal, and an outage is many refusals.
        if exc is not None:
            logger.debug("error_response factory failed", exc_info=exc)
        if not self._warned:
            self._warned = True
            logger.warning("error_response factory %s; sending the default 503 instead", what)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def shed_behind(exc: BaseException) -> Shed | None:
    """The refusal behind ``exc``, if a shed outbound call (or a limiter's shed) escaped
    the app: itself, or what it was raised ``from``."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None or isinstance(current, Shed):
            return current
        current = current.__cause__
    return None


def refusal_for(shed: Shed) -> Refusal:
    """The answer to a shed that escaped the app: ``overloaded``, or ``unavailable`` for
    another service that is down."""
    if isinstance(shed, OriginUnavailable):
        return Refusal("unavailable", "origin_unavailable", shed.retry_after)
    return Refusal("overloaded", shed.reason, shed.retry_after)
