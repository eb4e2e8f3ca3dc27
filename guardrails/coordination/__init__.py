"""Coordination among processes: one connection budget and one breaker for a fleet.

- :mod:`~guardrails.coordination.coordinator`: :class:`RedisCoordinator`, which runs
  the parts below on the guard's event loop;
- :mod:`~guardrails.coordination.protocol`: :class:`Coordinator`, what a guard asks of
  any coordinator;
- :mod:`~guardrails.coordination.lease`: the slots a process leases from the budget;
- :mod:`~guardrails.coordination.shared_breaker`: the breaker state shared over Redis;
- :mod:`~guardrails.coordination.events`: the pub/sub channel: breaker news, requests for slots;
- :mod:`~guardrails.coordination.link`: the client, and whether Redis answers;
- :mod:`~guardrails.coordination.lua`: the Redis keys, and the Lua scripts in ``scripts/``.
"""
