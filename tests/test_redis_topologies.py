"""The Redis that teams run: a Redis Cluster of three masters, and Sentinel with a failover.

Both are real servers on loopback, started by the suite (tests/redisserver.py). Each
guard gets a client of its own, as each process would build one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio
import pytest
from guardfleet import (
    Load,
    coordinator_of,
    fleet,
    generations,
    held,
    settled,
    unique,
    wait_until,
)
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redisserver import Cluster, Sentineled, SentinelServer, start_cluster, start_sentinel

import guardrails as gr
from guardrails.coordination.lua import Keys
from guardrails.fallback import CachedResponse

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[Cluster]:
    """A three-master Redis Cluster for this module; tests keep apart by key names."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def sentinel_factory() -> Iterator[Callable[[], Sentineled]]:
    """Start a master, a replica and a Sentinel of one's own; all closed after the test."""
    started: list[Sentineled] = []

    def factory() -> Sentineled:
        started.append(start_sentinel())
        return started[-1]

    try:
        yield factory
    finally:
        for setup in started:
            setup.close()


def cluster_client(cluster: Cluster) -> RedisCluster:
    return RedisCluster(host="127.0.0.1", port=cluster.port)


# -- Redis Cluster -----------------------------------------------------------------------


async def test_every_key_of_a_budget_lives_in_one_cluster_slot(redis_cluster: Cluster) -> None:
    client = cluster_client(redis_cluster)
    try:
        slots = {client.keyslot(key) for key in Keys.of("orders-db").every}
        assert len(slots) == 1
        assert slots != {client.keyslot(key) for key in Keys.of("billing-db").every}
    finally:
        await client.aclose()


async def test_on_a_cluster_the_fleet_shares_one_budget_and_notices_a_flush(
    redis_cluster: Cluster,
) -> None:
    async with fleet(
        lambda: cluster_client(redis_cluster), 2, budget=6, concurrency=6, name=unique("cl")
    ) as guards:
        first, second = guards
        load = Load(guards)
        try:
            load.start(0, 10)
            await wait_until(lambda: settled(guards) and held(first) == 6, within=5)
            load.start(1, 10)
            await wait_until(lambda: held(first) == held(second) == 3, within=5)
            # Flushing the node that owns the budget's slot is a new generation there.
            client = await cluster_client(redis_cluster).initialize()
            try:
                node = client.get_node_from_key(Keys.of(coordinator_of(first).name).leases)
                await client.flushall(target_nodes=node)
            finally:
                await client.aclose()
            await wait_until(lambda: generations(guards) == [1, 1], within=5)
            await wait_until(lambda: settled(guards) and held(first) == held(second) == 3, 5)
            done = await load.completed_within(0.3)
        finally:
            await load.stop()
        print(f"\nslots in use at once, at most: {load.peak} of 6")
        assert load.peak <= 6
        assert all(n > 0 for n in done), done


async def test_on_a_cluster_breaker_news_travels_by_sharded_pub_sub(redis_cluster: Cluster) -> None:
    settings = gr.BreakerSettings(fail_max=1, reset_timeout=30.0)
    name = unique("news")
    channel = Keys.of(name).channel
    # Renewals every 10 s: news seen within seconds came by pub/sub, not by a renewal.
    async with fleet(
        lambda: cluster_client(redis_cluster),
        2,
        budget=4,
        concurrency=2,
        name=name,
        breaker=settings,
        lease_ttl=30.0,
    ) as (first, second):
        client = await cluster_client(redis_cluster).initialize()
        try:
            node = client.get_node_from_key(channel)

            async def subscribers() -> int:
                counts = await client.pubsub_shardnumsub(channel, target_nodes=node)
                return sum(int(n) for _, n in counts)

            with anyio.fail_after(5):
                while await subscribers() < 2:
                    await anyio.sleep(0.02)
        finally:
            await client.aclose()
        first.breaker.force_open(30.0)  # as an outage seen by the first would
        await wait_until(lambda: second.breaker.state == "open", within=5)
        assert coordinator_of(second).remote_opens_total == 1


async def test_the_response_store_works_on_a_cluster(redis_cluster: Cluster) -> None:
    # Learning the cluster's layout takes a few round trips: done at startup, not within
    # the store's 0.1 s per call.
    client = await cluster_client(redis_cluster).initialize()
    store = gr.RedisCache(client, prefix=f"{unique('c')}:")
    stored = CachedResponse.build(200, [(b"content-type", b"text/plain")], b"hi")
    for key in ("a", "b", "c", "d"):  # keys spread over the nodes
        await store.set(key, stored, 5)
        assert await store.get(key) == stored
    assert store.snapshot()["redis"] == f"cluster 127.0.0.1:{redis_cluster.port}"
    await store.aclose()
    assert await client.ping()  # the store left the client it was given open
    await client.aclose()


# -- Sentinel ----------------------------------------------------------------------------


class Sentinels:
    """Clients of the master the Sentinel names, one per guard, and their Sentinel clients."""

    def __init__(self, setup: Sentineled) -> None:
        self.setup = setup
        self.made: list[Sentinel] = []

    def client(self) -> object:
        sentinel = Sentinel([self.setup.address], socket_timeout=0.5)
        self.made.append(sentinel)
        return sentinel.master_for(SentinelServer.SERVICE, socket_timeout=0.5)

    async def aclose(self) -> None:
        for sentinel in self.made:
            for client in sentinel.sentinels:
                await client.aclose()


async def test_a_sentinel_failover_under_load_keeps_the_fleet_inside_the_budget(
    sentinel_factory: Callable[[], Sentineled],
) -> None:
    setup = sentinel_factory()
    sentinels = Sentinels(setup)
    async with fleet(
        sentinels.client, 3, budget=6, concurrency=6, per_process=2, name="sf"
    ) as guards:
        load = Load(guards)
        try:
            for index in range(3):
                load.start(index, 8)
            await wait_until(lambda: settled(guards) and sum(map(held, guards)) == 6, 5)
            await anyio.to_thread.run_sync(setup.fail_over)  # the former master stays writable
            await wait_until(lambda: generations(guards) == [1, 1, 1], within=5)
            await wait_until(lambda: settled(guards), within=5)
            done = await load.completed_within(0.5)
        finally:
            await load.stop()
        print(f"\nslots in use at once, at most: {load.peak} of 6")
        assert load.peak <= 6
        assert all(n > 0 for n in done), done
        snapshot = coordinator_of(guards[0]).snapshot()
        assert snapshot["redis"] == f"sentinel service {SentinelServer.SERVICE}"
    await sentinels.aclose()
