"""The checks on what ``Guardrails(...)`` is given: each argument the guard itself uses.

Each check raises at construction with a message that says what to change, and
returns the value the guard keeps (the default where ``None`` means "the default").
The limiter, the breaker, the health endpoint and the pool watchers check their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, TypeVar

from guardrails.budget import ConnectionBudget
from guardrails.fallback import CREDENTIAL_HEADERS, MemoryCache, ResponseStore
from guardrails.policy import Policy

__all__ = [
    "checked_coordinator",
    "checked_error_response",
    "checked_flag",
    "checked_instance",
    "checked_policies",
    "checked_slots",
    "checked_store",
    "credential_headers",
]

T = TypeVar("T")
V = TypeVar("V")


def checked_slots(concurrency: int | None, budget: ConnectionBudget | None) -> int:
    """The number of slots: ``concurrency``, or the budget's ``per_process``; exactly one."""
    if (concurrency is None) == (budget is None):
        raise ValueError(
            "pass exactly one of concurrency=N (slots per process) or "
            "budget=ConnectionBudget(...) (its per_process becomes the slots)"
        )
    if budget is not None:
        if not isinstance(budget, ConnectionBudget):
            raise TypeError(f"budget must be a ConnectionBudget, not {budget!r}")
        return budget.per_process
    assert concurrency is not None
    return concurrency


def checked_instance(value: T | None, kind: type[T], name: str) -> T | None:
    """``value``, which must be None or a guardrails ``kind`` (the argument ``name``)."""
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{name} must be a guardrails {kind.__name__}, not {value!r}")
    return value


def checked_policies(policies: Mapping[str, Policy] | None) -> dict[str, Policy]:
    """A copy of the path pattern -> :class:`~guardrails.policy.Policy` mapping."""
    if policies is not None and not isinstance(policies, Mapping):
        raise TypeError(
            "policies must be a mapping of path pattern to Policy, e.g. "
            "{'/reports/{path:path}': Policy(priority='low')}"
        )
    return dict(policies or {})


def checked_store(cache: ResponseStore | Literal["memory"] | None) -> ResponseStore | None:
    """The response store: ``"memory"`` is an in-memory one of 10,000 entries."""
    if cache == "memory":
        cache = MemoryCache(max_entries=10_000)
    if cache is not None and not all(
        callable(getattr(cache, name, None)) for name in ("get", "set", "delete")
    ):
        raise TypeError(
            f"cache must be a response store such as MemoryCache(max_entries=10_000), not {cache!r}"
        )
    return cache


def credential_headers(identity_headers: Iterable[str]) -> frozenset[bytes]:
    """The request headers that say who is asking: the defaults and ``identity_headers``,
    lowercase, as they arrive in ASGI."""
    if isinstance(identity_headers, str | bytes) or not all(
        isinstance(name, str) and name.strip() for name in identity_headers
    ):
        raise TypeError(
            "identity_headers must be a list of header names, e.g. "
            f"('x-tenant-token',), not {identity_headers!r}"
        )
    return CREDENTIAL_HEADERS | frozenset(
        name.strip().lower().encode("latin-1") for name in identity_headers
    )


def checked_flag(value: bool, name: str) -> bool:
    """``value``, which must be True or False (the argument ``name``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def checked_error_response(factory: V) -> V:
    """``factory``, the app's own 503, which must be None or a callable."""
    if factory is not None and not callable(factory):
        raise TypeError(
            "error_response must be a callable (request, error, retry_after) -> Response "
            f"or None, not {factory!r}"
        )
    return factory


def checked_coordinator(coordinator: V) -> V:
    """``coordinator``, which must be None or offer ``attach`` and ``start``."""
    if coordinator is not None and not all(
        callable(getattr(coordinator, n, None)) for n in ("attach", "start")
    ):
        raise TypeError(
            f"coordinator must be a guardrails coordinator such as "
            f"RedisCoordinator(url), not {coordinator!r}"
        )
    return coordinator
