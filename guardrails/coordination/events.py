"""Breaker news from the other processes: a pub/sub subscription that outlives Redis failures.

A plain Redis (or one Sentinel manages) carries the news by PUBLISH and SUBSCRIBE; a
Redis Cluster by sharded pub/sub (SPUBLISH, SSUBSCRIBE), which keeps the channel on the
node of its hash slot. A cluster client without pub/sub (redis-py before 8.0) gets no
subscription: the lease renewals carry the same news, a renewal later.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

__all__ = ["listen", "publish_command", "subscribes"]

_POLL = 0.2
"""Seconds one wait for a message lasts, so that a closing coordinator is noticed."""


def publish_command(sharded: bool) -> str:
    """The command the scripts publish news with: ``SPUBLISH`` on a Redis Cluster."""
    return "SPUBLISH" if sharded else "PUBLISH"


def subscribes(client: Any) -> bool:
    """Can ``client`` subscribe at all? (redis-py's asyncio RedisCluster can from 8.0.)"""
    return callable(getattr(client, "pubsub", None))


async def listen(
    client_of: Callable[[], Any],
    epoch: Callable[[], object],
    channel: str,
    *,
    sharded: bool,
    timeout: float,
    retry_interval: float,
    deliver: Callable[[object], None],
    running: Callable[[], bool],
) -> None:
    """Hand each message's data on ``channel`` to ``deliver`` while ``running()``.

    ``client_of()`` gives the client to subscribe with, or None while Redis is not
    answering; when ``epoch()`` changes (another server answers: a failover) the
    subscription is made again, on the server the client reaches now; after any failure,
    ``retry_interval`` seconds later. Returns at once when the client cannot subscribe.
    """
    while running():
        client = client_of()
        if client is None:
            await asyncio.sleep(_POLL / 4)
            continue
        if not subscribes(client):
            return  # the renewals carry the news
        started = epoch()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            if sharded and not hasattr(pubsub, "get_sharded_message"):
                return
            if sharded:
                await asyncio.wait_for(pubsub.ssubscribe(channel), timeout)
            else:
                await asyncio.wait_for(pubsub.subscribe(channel), timeout)
            while running() and client_of() is client and epoch() == started:
                if sharded:
                    message = await pubsub.get_sharded_message(
                        ignore_subscribe_messages=True, timeout=_POLL
                    )
                else:
                    message = await pubsub.get_message(timeout=_POLL)
                if message is not None:
                    deliver(message.get("data"))
        except asyncio.CancelledError:
            raise
        except Exception:
            # The lease loop notices and reports the outage; just listen again later.
            await asyncio.sleep(retry_interval)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
