"""Prove your degradation policies in your own tests: fault injection for guardrails.

Nothing here touches the real database or patches guardrails: faults go in at the
seams a real outage goes through (the pool watchers' acquire hook, the httpx
transport, the breaker's clock, the retries' backoff), so the classifier, the breaker,
the fallback and telemetry answer them as they would answer the real thing::

    from guardrails.testing import database_down, instant_retries

    def test_dashboard_survives_an_outage(client):
        client.get("/dashboard")                     # stored for the fallback
        with instant_retries(), database_down(guard):
            response = client.get("/dashboard")
        assert response.headers["x-guardrails"] == "stale"

- :mod:`~guardrails.testing.database`: :class:`DatabaseFault`, :func:`database_down`,
  :func:`slow_database`, :func:`flaky_database`;
- :mod:`~guardrails.testing.outbound`: :class:`FaultTransport` for ``GuardedTransport``;
- :mod:`~guardrails.testing.chaos`: :class:`ChaosMiddleware` and :class:`ChaosRule`,
  for staging (off unless enabled);
- :mod:`~guardrails.testing.clock`: :class:`ManualClock`, :func:`breaker_clock`;
- :mod:`~guardrails.testing.retries`: :func:`instant_retries`;
- :mod:`~guardrails.testing.pytest_plugin`: fixtures, opt-in with
  ``pytest_plugins = ["guardrails.testing.pytest_plugin"]``.
"""

from guardrails.testing.chaos import ChaosMiddleware, ChaosRule
from guardrails.testing.clock import ManualClock, breaker_clock
from guardrails.testing.database import (
    DatabaseFault,
    database_down,
    flaky_database,
    slow_database,
)
from guardrails.testing.outbound import FaultTransport
from guardrails.testing.retries import InstantRetries, instant_retries

__all__ = [
    "ChaosMiddleware",
    "ChaosRule",
    "DatabaseFault",
    "FaultTransport",
    "InstantRetries",
    "ManualClock",
    "breaker_clock",
    "database_down",
    "flaky_database",
    "instant_retries",
    "slow_database",
]
