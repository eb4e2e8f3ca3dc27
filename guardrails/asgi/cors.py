"""CORS for what guardrails answers itself: refusals, stale and fresh copies.

The recipes add ``GuardrailsMiddleware`` last, which makes it the outermost layer,
outside the app's ``CORSMiddleware``: its own answers would then reach a browser
without ``Access-Control-Allow-Origin``, and a frontend could never read the 503 or its
``Retry-After``. So the middleware finds the app's ``CORSMiddleware`` below it and sends
its own answers through that middleware's header logic; preflight requests pass
straight through (they never touch the database).
"""

from __future__ import annotations

import functools
import logging

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Scope, Send

__all__ = ["find_cors", "is_preflight", "through_cors", "warn_if_lost"]

logger = logging.getLogger("guardrails")

_DEPTH = 64


def find_cors(app: ASGIApp) -> CORSMiddleware | None:
    """The ``CORSMiddleware`` among the layers below ``app``, if there is one."""
    current: object = app
    for _ in range(_DEPTH):
        if isinstance(current, CORSMiddleware):
            return current
        current = getattr(current, "app", None)
        if current is None:
            return None
    return None


def is_preflight(scope: Scope) -> bool:
    """A CORS preflight: ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``."""
    names = {name for name, _ in scope["headers"]}
    return b"origin" in names and b"access-control-request-method" in names


def through_cors(cors: CORSMiddleware | None, scope: Scope, send: Send) -> Send:
    """``send``, adding the app's CORS headers to a response when the request has an Origin."""
    if cors is None:
        return send
    for name, _ in scope["headers"]:
        if name == b"origin":
            return functools.partial(cors.send, send=send, request_headers=Headers(scope=scope))
    return send


def warn_if_lost(app: object, found: CORSMiddleware | None, ours: type) -> None:
    """Say once, at startup, if the app's CORSMiddleware sits below guardrails where it
    cannot be found (its answers would reach browsers without CORS headers)."""
    stack = getattr(app, "user_middleware", None)
    if found is not None or not isinstance(stack, list):
        return
    classes = [getattr(entry, "cls", None) for entry in stack]
    if CORSMiddleware not in classes or ours not in classes:
        return
    if classes.index(CORSMiddleware) > classes.index(ours):  # inside guardrails, unseen
        logger.warning(
            "guardrails cannot reach the app's CORSMiddleware below it: its 503s will reach "
            "browsers without CORS headers. Add GuardrailsMiddleware before CORSMiddleware "
            "(app.add_middleware(GuardrailsMiddleware, ...) first, then CORSMiddleware), so "
            "that CORSMiddleware wraps it."
        )
