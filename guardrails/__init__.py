"""Keep Starlette and FastAPI apps alive when their database pool is under pressure.

Everything public is importable from here::

    import guardrails as gr
"""

from guardrails.budget import ConnectionBudget
from guardrails.errors import BudgetExceeded, GuardrailsError, ReadOnly, Shed, Unavailable
from guardrails.guard import Guardrails
from guardrails.limiter import ConcurrencyLimiter, Permit, Priority
from guardrails.middleware import GuardrailsMiddleware
from guardrails.policy import OnUnavailable, Policy, policy

__all__ = [
    "BudgetExceeded",
    "ConcurrencyLimiter",
    "ConnectionBudget",
    "Guardrails",
    "GuardrailsError",
    "GuardrailsMiddleware",
    "OnUnavailable",
    "Permit",
    "Policy",
    "Priority",
    "ReadOnly",
    "Shed",
    "Unavailable",
    "policy",
]
