"""Prometheus metrics for a guard (install the ``prometheus`` extra).

The public import path for :class:`GuardrailsCollector` and :func:`metrics_endpoint`;
they live in :mod:`guardrails.observe.prometheus`.
"""

from guardrails.observe.prometheus import GuardrailsCollector, metrics_endpoint

__all__ = ["GuardrailsCollector", "metrics_endpoint"]
