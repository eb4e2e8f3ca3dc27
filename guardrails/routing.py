"""Route resolution: which :class:`~guardrails.policy.Policy` a request gets.

Routing has not happened yet when the middleware runs, so :class:`RouteResolver`
matches a request against the app's routes itself, once per distinct path, and
computes everything the middleware needs about a route once.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import Host, Mount, WebSocketRoute, compile_path

from guardrails.limiter import Priority
from guardrails.policy import POLICY_ATTRIBUTE, Policy

__all__ = ["UNMATCHED", "ResolvedRoute", "RouteResolver"]

logger = logging.getLogger("guardrails")

UNMATCHED = "<unmatched>"
"""Route template reported for requests that match no route (bounded metric labels)."""


@dataclass(slots=True)
class ResolvedRoute:
    """What the middleware needs to know about one route, computed once per route."""

    template: str
    policy: Policy
    priority: Priority
    bulkhead: str | None
    timeout: float | None
    bypass: bool
    """Exempt, or not using the database: the limiter is not involved."""
    caches: bool = False
    """The policy has ``cache_ttl`` or ``stale_ttl``: responses are stored for reuse."""
    writes: bool | None = None
    """Refused in read-only mode: always (True), never (False), by method (None)."""
    max_body: int | None = None
    """Bytes of request body read before a slot is taken (None: the app streams it)."""
    body_timeout: float = 10.0
    """Seconds the client has to send that body."""
    send_timeout: float | None = None
    """Seconds one response chunk may wait for the client to read it."""
    inline: bool = False
    """No stored copies, deadline, bulkhead or ``writes=True``: a read with the breaker
    closed and a free slot is admitted in one step."""


_PARAM = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::([a-zA-Z_][a-zA-Z0-9_]*))?}")


@dataclass(slots=True)
class _Pattern:
    """A ``policies=`` key: optional method and a Starlette path pattern."""

    source: str
    method: str | None
    path: str
    on_path: re.Pattern[str]
    on_template: re.Pattern[str]
    policy: Policy
    specificity: tuple[int, int, int, int]

    @classmethod
    def parse(cls, source: str, chosen: Policy) -> _Pattern:
        if not isinstance(chosen, Policy):
            raise TypeError(f"policies[{source!r}] must be a guardrails Policy, not {chosen!r}")
        verb, _, path = source.strip().rpartition(" ")
        method = verb.strip().upper() or None
        if not path.startswith("/"):
            raise ValueError(
                f"policy pattern {source!r} must be a path starting with '/', optionally "
                "after a method: '/reports/{path:path}' or 'POST /orders/{id}'"
            )
        try:
            on_path, _, _ = compile_path(path)
        except (AssertionError, ValueError) as exc:
            raise ValueError(f"policy pattern {source!r} is not a valid path: {exc}") from None
        # Templates show parameters as "{name}", so match them against a version of
        # the pattern where every parameter accepts such a placeholder.
        pieces, last = [], 0
        for match in _PARAM.finditer(path):
            pieces.append(re.escape(path[last : match.start()]))
            pieces.append(".*" if match.group(2) == "path" else "[^/]+")
            last = match.end()
        pieces.append(re.escape(path[last:]))
        on_template = re.compile("^" + "".join(pieces) + "$")
        literal = _PARAM.sub("", path)
        catch_all = sum(1 for m in _PARAM.finditer(path) if m.group(2) == "path")
        params = len(_PARAM.findall(path))
        specificity = (
            -catch_all,
            literal.count("/") - catch_all,
            -params,
            len(literal) + (1 if method else 0),
        )
        return cls(source, method, path, on_path, on_template, chosen, specificity)

    def matches(self, method: str, text: str, *, template: bool) -> bool:
        if self.method is not None and self.method != method:
            return False
        return (self.on_template if template else self.on_path).match(text) is not None


@dataclass(slots=True)
class _Entry:
    """One route of the app, flattened: its full template, regex, methods, endpoint."""

    regex: re.Pattern[str]
    template: str
    methods: frozenset[str] | None
    endpoint: object
    resolved: dict[str, ResolvedRoute] = field(default_factory=dict)


def _route_views(routes: Iterable[Any]) -> Iterable[Any]:
    # FastAPI >= 0.137 keeps included routers as nodes in app.routes; its public
    # iter_route_contexts() yields each route with the include prefix applied.
    fastapi_routing = sys.modules.get("fastapi.routing")
    iterate = getattr(fastapi_routing, "iter_route_contexts", None)
    return iterate(list(routes)) if iterate is not None else routes


def _compile(template: str) -> tuple[re.Pattern[str], str]:
    """Regex and label of a full template. A parameter repeated across a Mount and its
    routes (``Mount("/{id}", routes=[Route("/{id}", ...)])``, valid Starlette) is
    matched under a second name and labelled with its own."""
    seen: dict[str, int] = {}

    def unique(match: re.Match[str]) -> str:
        name, convertor = match.group(1), match.group(2)
        count = seen[name] = seen.get(name, 0) + 1
        if count == 1:
            return match.group(0)
        return "{" + f"{name}__{count}" + (f":{convertor}" if convertor else "") + "}"

    regex, fmt, _ = compile_path(_PARAM.sub(unique, template))
    return regex, _RENAMED.sub(r"{\1}", fmt)


_RENAMED = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*?)__\d+}")


def _flatten(routes: Iterable[Any], prefix: str) -> Iterator[_Entry]:
    for view in _route_views(routes):
        original = getattr(view, "original_route", view)
        if isinstance(original, WebSocketRoute | Host):
            # Websockets pass through; host routing needs the Host header (unsupported).
            continue
        path = getattr(view, "path", None)
        if not isinstance(path, str):
            continue
        try:
            if isinstance(original, Mount):
                children = getattr(view, "routes", None)
                mount_path = prefix + path.rstrip("/")
                if children:
                    yield from _flatten(children, mount_path)
                else:
                    regex, fmt = _compile(mount_path + "/{path:path}")
                    yield _Entry(regex, fmt, None, getattr(view, "app", None))
                continue
            methods = getattr(view, "methods", None)
            regex, fmt = _compile(prefix + path)
        except (AssertionError, ValueError, re.error) as exc:
            # One odd route must not take every policy of the app down with it.
            logger.warning(
                "guardrails cannot match route %r (%s): it gets the default policy",
                prefix + path,
                type(exc).__name__,
            )
            continue
        yield _Entry(
            regex,
            fmt,
            frozenset(methods) if methods else None,
            getattr(view, "endpoint", None),
        )


def _count(routes: object) -> int:
    return len(routes) if type(routes) is list else -1


def _route_ids(routes: object) -> tuple[int, ...]:
    """Every route object in the tree, by identity: any change of the table changes it."""
    found: list[int] = []
    stack = [routes]
    while stack:
        current = stack.pop()
        if not isinstance(current, list | tuple):
            continue
        for route in current:
            found.append(id(route))
            stack.append(getattr(route, "routes", None))
    return tuple(found)


_RECHECK_EVERY = 1024
"""Requests between two full comparisons of the route table (appends show at once)."""


class RouteResolver:
    """Finds the :class:`ResolvedRoute` for a request, caching per method and path.

    Precedence: a ``@policy`` on the endpoint, then the most specific matching
    pattern in ``policies``, then the default policy. A request that matches no
    route gets the patterns matched against its path, then the default.
    """

    def __init__(
        self,
        patterns: Mapping[str, Policy],
        default: Policy,
        bulkhead_for: Callable[[Policy, str], str | None],
        cache_size: int = 2048,
    ) -> None:
        self._patterns = sorted(
            (_Pattern.parse(source, chosen) for source, chosen in patterns.items()),
            key=lambda p: p.specificity,
            reverse=True,
        )
        self._default = default
        self._bulkhead_for = bulkhead_for
        self._cache_size = cache_size
        self._cache: dict[tuple[str, str], ResolvedRoute] = {}
        self._app: object = None
        self._routes: object = None
        self._routes_count = -1
        self._ids: tuple[int, ...] = ()
        self._requests = 0
        self._entries: list[_Entry] = []

    def resolve(self, app: object, method: str, path: str) -> ResolvedRoute:
        """The resolved route for a request to ``app`` (the Starlette/FastAPI app).

        The route table is rebuilt when the app changes or its route list changes
        length (routes added after startup show at once); any other change (a route
        replaced in place, routes added inside a Mount) is found by a full comparison
        every 1024 requests.
        """
        routes = self._routes
        self._requests += 1
        if (
            app is not self._app
            or (type(routes) is list and len(routes) != self._routes_count)
            or (self._requests % _RECHECK_EVERY == 0 and _route_ids(routes) != self._ids)
        ):
            self._rebuild(app)
        key = (method, path)
        found = self._cache.get(key)
        if found is None:
            found = self._lookup(method, path)
            if len(self._cache) >= self._cache_size:
                # Paths with ids are unbounded: drop the oldest entry, keep the rest warm.
                del self._cache[next(iter(self._cache))]
            self._cache[key] = found
        return found

    def routes(self, app: object) -> list[ResolvedRoute]:
        """Every route of ``app`` as resolved (for startup checks; not per request)."""
        if app is not self._app:
            self._rebuild(app)
        return [
            self._for_entry(entry, next(iter(sorted(entry.methods or {"GET"}))))
            for entry in self._entries
        ]

    def _rebuild(self, app: object) -> None:
        routes = getattr(app, "routes", None)
        self._app = app
        self._routes = routes
        self._routes_count = _count(routes)
        self._ids = _route_ids(routes)
        self._cache.clear()
        self._entries = list(_flatten(routes, "")) if isinstance(routes, Iterable) else []

    def _lookup(self, method: str, path: str) -> ResolvedRoute:
        partial: _Entry | None = None
        for entry in self._entries:
            if entry.regex.match(path) is None:
                continue
            if entry.methods is None or method in entry.methods:
                return self._for_entry(entry, method)
            if partial is None:
                partial = entry
        if partial is not None:
            return self._for_entry(partial, method)
        return self._for_unmatched(method, path)

    def _for_entry(self, entry: _Entry, method: str) -> ResolvedRoute:
        resolved = entry.resolved.get(method)
        if resolved is None:
            chosen = getattr(entry.endpoint, POLICY_ATTRIBUTE, None)
            if not isinstance(chosen, Policy):
                chosen = self._pattern_policy(method, entry.template)
            resolved = entry.resolved[method] = self._make(entry.template, chosen)
        return resolved

    def _for_unmatched(self, method: str, path: str) -> ResolvedRoute:
        for pattern in self._patterns:
            if pattern.matches(method, path, template=False):
                return self._make(pattern.path, pattern.policy)
        return self._make(UNMATCHED, self._default)

    def _pattern_policy(self, method: str, template: str) -> Policy:
        for pattern in self._patterns:
            if pattern.matches(method, template, template=True):
                return pattern.policy
        return self._default

    def _make(self, template: str, chosen: Policy) -> ResolvedRoute:
        bulkhead = self._bulkhead_for(chosen, template)
        timeout = chosen.timeout if isinstance(chosen.timeout, float) else None
        caches = chosen.cache_ttl is not None or chosen.stale_ttl is not None
        inline = not caches and timeout is None and bulkhead is None
        return ResolvedRoute(
            template=template,
            policy=chosen,
            priority=Priority(chosen.priority),
            bulkhead=bulkhead,
            timeout=timeout,
            bypass=chosen.exempt or not chosen.needs_db,
            caches=caches,
            writes=chosen.writes,
            max_body=chosen.max_body,
            body_timeout=chosen.body_timeout if isinstance(chosen.body_timeout, float) else 10.0,
            send_timeout=chosen.send_timeout if isinstance(chosen.send_timeout, float) else None,
            inline=inline and chosen.writes is not True,
        )
