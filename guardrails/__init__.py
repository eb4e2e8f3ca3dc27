"""Keep Starlette and FastAPI apps alive when their database pool is under pressure.

Everything public is importable from here::

    import guardrails as gr
"""

from guardrails.adaptive import AdaptiveLimit
from guardrails.asgi.middleware import GuardrailsMiddleware
from guardrails.breaker import Breaker, BreakerSettings
from guardrails.budget import ConnectionBudget, ServerlessPlan
from guardrails.coordination.coordinator import RedisCoordinator
from guardrails.errors import (
    BudgetExceeded,
    Classifier,
    ErrorKind,
    GuardrailsError,
    ReadOnly,
    Shed,
    Unavailable,
    classify,
)
from guardrails.fallback import CachedResponse, MemoryCache, RedisCache, ResponseStore
from guardrails.guard import Guardrails
from guardrails.limiter import ConcurrencyLimiter, Permit, Priority
from guardrails.observe.triage import Diagnosis, EarlyWarning
from guardrails.outbound import GuardedTransport, OriginUnavailable
from guardrails.policy import OnUnavailable, Policy, policy
from guardrails.pools.probe import ping
from guardrails.retry import RetryBudget, RetrySettings

__all__ = [
    "AdaptiveLimit",
    "Breaker",
    "BreakerSettings",
    "BudgetExceeded",
    "CachedResponse",
    "Classifier",
    "ConcurrencyLimiter",
    "ConnectionBudget",
    "Diagnosis",
    "EarlyWarning",
    "ErrorKind",
    "GuardedTransport",
    "Guardrails",
    "GuardrailsError",
    "GuardrailsMiddleware",
    "MemoryCache",
    "OnUnavailable",
    "OriginUnavailable",
    "Permit",
    "Policy",
    "Priority",
    "ReadOnly",
    "RedisCache",
    "RedisCoordinator",
    "ResponseStore",
    "RetryBudget",
    "RetrySettings",
    "ServerlessPlan",
    "Shed",
    "Unavailable",
    "classify",
    "ping",
    "policy",
]
