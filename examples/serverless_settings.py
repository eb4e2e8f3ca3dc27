"""Settings for a serverless deployment: a small pool per instance inside a global budget.

Print the arithmetic for your numbers::

    .venv/bin/python -m examples.serverless_settings --max-connections 100 --peak-instances 40

Each instance opens its own pool, and the platform runs as many instances as traffic
asks for: 40 instances x pool 5 = 200 connections against a `max_connections` of 100.
The cure is a pool of 1 to 4 per instance, sized from the peak instance count, a short
acquire timeout, an idle timeout so parked instances give connections back, the pool
created once per instance (outside the handler), and a concurrency cap per instance at
the pool size. Beyond what arithmetic can cap, share the budget through Redis
(``gr.RedisCoordinator``, with ``--redis-url``) or put PgBouncer / RDS Proxy in front.
See docs/serverless.md.
"""

from __future__ import annotations

import argparse
from typing import Any

import guardrails as gr


def settings(
    max_connections: int,
    peak_instances: int,
    reserved: int = 3,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """Pool and guard settings for one instance, from the database limit and the peak.

    With ``redis_url`` the instances share the whole budget through a
    :class:`~guardrails.RedisCoordinator`: each may use up to its pool when others are
    idle, and all together never more than the budget.
    """
    budget = gr.ConnectionBudget(max_connections=max_connections, reserved=reserved)
    plan = budget.serverless(peak_instances)
    pool_size = max(1, min(plan.pool_size, 4))
    chosen: dict[str, Any] = {
        "plan": plan,
        # create_async_engine(url, **engine_kwargs) once per instance, at import time
        "engine_kwargs": {
            "pool_size": pool_size,
            "max_overflow": 0,
            "pool_timeout": 2,  # fail fast instead of eating the function's time limit
            "pool_recycle": 300,
            "pool_pre_ping": True,  # instances thaw with connections the server dropped
        },
        # gr.Guardrails(**guard_kwargs): admit no more work than the pool can run
        "guard_kwargs": {"concurrency": pool_size, "queue_timeout": 0.25, "max_queue": 8},
    }
    if redis_url is not None:
        chosen["guard_kwargs"]["coordinator"] = gr.RedisCoordinator(
            redis_url,
            budget=budget.app_total,
            per_process=max(1, min(plan.pool_size, pool_size)),  # while Redis is down
        )
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--max-connections", type=int, default=100)
    parser.add_argument("--peak-instances", type=int, default=40)
    parser.add_argument("--reserved", type=int, default=3)
    parser.add_argument("--redis-url", default=None, help="share the budget through Redis")
    args = parser.parse_args(argv)
    chosen = settings(args.max_connections, args.peak_instances, args.reserved, args.redis_url)
    plan = chosen["plan"]
    print(
        f"{plan.instances} instances share {plan.app_total} connections: "
        f"pool_size {plan.pool_size} each, {plan.total} at peak"
    )
    if plan.warning:
        print(f"warning: {plan.warning}")
    print(f"engine: {chosen['engine_kwargs']}")
    print(f"guard:  {chosen['guard_kwargs']}")
    return 0 if plan.pool_size >= 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
