"""``GuardrailsMiddleware``: the pure-ASGI front door that admits, queues or sheds requests.

It resolves each HTTP request's route and hands the requests that need the database
to a :class:`~guardrails.asgi.request.GuardedRequest`, which runs the request's life.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from guardrails.asgi.clients import ClientWatch
from guardrails.asgi.cors import find_cors, is_preflight, warn_if_lost
from guardrails.asgi.refusal import Refusals
from guardrails.asgi.request import GuardedRequest
from guardrails.guard import Guardrails

__all__ = ["GuardrailsMiddleware"]

logger = logging.getLogger("guardrails")


class GuardrailsMiddleware:
    """Pure ASGI middleware applying a :class:`~guardrails.Guardrails` to every request.

    ``app.add_middleware(GuardrailsMiddleware, guard=guard)`` on Starlette or FastAPI.
    For each HTTP request it resolves the route's policy, then:

    - exempt routes and routes that do not need the database pass straight through;
      websocket and lifespan scopes are untouched;
    - a fresh cached response (``cache_ttl``) is served without touching the database;
    - in read-only mode (or while the breaker is open, with ``read_only_on_open``)
      unsafe methods get 503 ``read_only``;
    - while the breaker is open, database routes get 503 ``unavailable`` at once;
    - the rest take a slot, waiting at most ``queue_timeout`` (or their deadline), or
      get 503 ``overloaded``;
    - an outage escaping the app before its response started gets 503 ``unavailable``;
      a request past its policy ``timeout`` before its response started gets 503
      ``timeout``.

    Every 503 carries an integer ``Retry-After``. Routes with ``stale_ttl`` answer it
    with their last good response instead, marked ``X-Guardrails: stale`` with ``Age``.
    """

    def __init__(self, app: ASGIApp, *, guard: Guardrails) -> None:
        if not isinstance(guard, Guardrails):
            raise TypeError(
                f"guard must be a guardrails.Guardrails, not {guard!r}: "
                "app.add_middleware(GuardrailsMiddleware, guard=Guardrails(...))"
            )
        self.app = app
        self.guard = guard
        self.refusals = Refusals(guard.error_response)
        """Sends the 503s (the app's ``error_response`` factory, else the default)."""
        self.clients = ClientWatch()
        """Requests waiting on slow clients; its watchdog runs in the guard's background."""
        guard.background.add(self.clients.run)
        self.cors = find_cors(app)
        """The app's CORSMiddleware below this one: guardrails' own answers get its headers."""
        self._checked = False
        self.warned: set[str] = set()
        """Routes whose broken callbacks were logged already (once per route)."""
        self._resolver = guard.route_resolver()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if not self._checked and scope["type"] == "lifespan":
                self._check_setup(scope.get("app"))
            await self.app(scope, receive, send)
            return
        if not self._checked:
            self._check_setup(scope.get("app"))
        method = scope["method"]
        route = self._resolver.resolve(
            scope.get("app"),
            method,
            route_path(scope) if scope.get("root_path") else scope["path"],
        )
        if route.bypass or (method == "OPTIONS" and is_preflight(scope)):
            await self.app(scope, receive, send)  # a preflight never touches the database
            return
        background = self.guard.background
        if not background.started:
            background.start_lazily()
        await GuardedRequest(self, scope, receive, send, route).handle()

    def _check_setup(self, app: object) -> None:
        """Say once, at startup, what this setup would silently lose."""
        self._checked = True
        warn_if_lost(app, self.cors, GuardrailsMiddleware)
        if self.guard.cache is None and app is not None:
            asking = sorted({r.template for r in self._resolver.routes(app) if r.caches})
            if asking:
                logger.warning(
                    "guardrails: cache=None switches caching off, so %s get no fresh or "
                    "stale copies; drop cache=None for the in-memory default, or pass a "
                    "store such as RedisCache(url)",
                    ", ".join(asking),
                )


def route_path(scope: Scope) -> str:
    """The path the app's router matches: without the root_path a server or Mount added
    (the same rule as Starlette's router)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    if path[len(root_path)] == "/":
        return path[len(root_path) :]
    return path
