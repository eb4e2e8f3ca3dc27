"""Outbound HTTP calls guarded like database calls: a breaker, retries and a bulkhead per origin.

::

    client = httpx.AsyncClient(transport=gr.GuardedTransport(guard=guard))

- :mod:`~guardrails.outbound.transport`: ``GuardedTransport``, the httpx transport;
- :mod:`~guardrails.outbound.call`: one call's attempts, retries and deadline;
- :mod:`~guardrails.outbound.origin`: one origin's breaker, bulkhead and counters;
- :mod:`~guardrails.outbound.outcome`: what counts as an origin outage, what may be retried;
- :mod:`~guardrails.outbound.settings`: the transport's validated settings;
- :mod:`~guardrails.outbound.errors`: ``OriginUnavailable``.
"""

from guardrails.outbound.errors import OriginUnavailable
from guardrails.outbound.transport import GuardedTransport

__all__ = ["GuardedTransport", "OriginUnavailable"]
