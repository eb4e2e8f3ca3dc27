"""The budget holds when Redis forgets: killed, restarted empty, flushed, failed over, stalled.

Redis may come back without the leases it kept (a restart without persistence, a
FLUSHALL, a replica promoted before it had every write), or answer nobody for a while.
The processes still run what they were granted: nothing new may be granted until their
use is on record again. The first tests run guards in one event loop (their slots in use
are the exact ground truth); the last runs real uvicorn servers on a real PostgreSQL,
with the queries running counted by PostgreSQL itself (pg_stat_activity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import pairwise

import anyio
import httpx
import pytest
from fleetservers import Monitor, Server, server_env, servers
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
from pgcluster import PostgresServer
from redis.asyncio import Redis
from redisserver import RedisProxy, RedisServer

import guardrails as gr

pytestmark = pytest.mark.anyio


# -- guards in one event loop ---------------------------------------------------------


async def test_after_a_flush_nobody_is_granted_more_until_every_guard_is_on_record(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    async with fleet(server.url, 2, budget=6, concurrency=6, name=unique("flush")) as guards:
        busy, idle = guards
        load = Load(guards)
        try:
            load.start(0, 10)
            await wait_until(lambda: settled(guards) and held(busy) == 6, within=5)
            raw = Redis.from_url(server.url)
            try:
                await raw.flushall()
            finally:
                await raw.aclose()
            # The idle guard wakes while Redis has no record of the busy one's 6 slots.
            load.start(1, 10)
            await wait_until(lambda: generations(guards) == [1, 1], within=3)
            await wait_until(lambda: settled(guards) and held(busy) == held(idle) == 3, 5)
            done = await load.completed_within(0.3)
        finally:
            await load.stop()
        print(f"\nslots in use at once, at most: {load.peak} of 6")
        assert load.peak <= 6
        assert all(n > 0 for n in done), done
    server.close()


async def test_a_stall_longer_than_a_lease_keeps_the_leases_of_guards_that_could_not_renew(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    async with fleet(
        server.url, 2, budget=6, concurrency=6, per_process=3, name=unique("stall")
    ) as guards:
        first, second = guards
        load = Load(guards)
        try:
            load.start(0, 10)
            await wait_until(lambda: settled(guards) and held(first) == 6, within=5)
            server.pause()  # answers nobody: every lease runs out by Redis's clock
            await wait_until(lambda: not coordinator_of(first).snapshot()["connected"], 3)
            await anyio.sleep(1.2)
            load.start(1, 10)  # wakes while Redis cannot hand out slots
            server.resume()
            await wait_until(lambda: settled(guards) and held(first) == held(second) == 3, 5)
            done = await load.completed_within(0.3)
        finally:
            await load.stop()
        print(f"\nslots in use at once, at most: {load.peak} of 6")
        assert load.peak <= 6
        assert generations(guards) == [0, 0]  # Redis kept its records: no settling needed
        assert all(n > 0 for n in done), done
    server.close()


async def test_a_failover_to_a_replica_that_missed_writes_keeps_the_budget(
    redis_factory: Callable[[], RedisServer],
) -> None:
    primary = redis_factory()
    # The replica syncs at once, not after the default 5 s wait for more replicas.
    assert primary.ask("CONFIG", "SET", "repl-diskless-sync-delay", "0").startswith("+OK")
    replica = RedisServer(primary.binary, options=("--replicaof", "127.0.0.1", str(primary.port)))
    proxy = RedisProxy(primary.port)  # the address every guard knows
    try:
        replica.start()
        await wait_until(lambda: "master_link_status:up" in replica.ask("INFO", "replication"), 5)
        await proxy.start()
        async with fleet(proxy.url, 2, budget=6, concurrency=6, name=unique("lossy")) as guards:
            busy, idle = guards
            load = Load(guards)
            try:
                await wait_until(lambda: settled(guards), within=5)
                # The replica stops following: what the primary records from now on, it misses.
                assert replica.ask("REPLICAOF", "NO", "ONE").startswith("+OK")
                load.start(0, 10)
                await wait_until(lambda: held(busy) == 6, within=5)
                primary.kill()
                proxy.switch(replica.port)  # the failover: the replica had the idle fleet's records
                load.start(1, 10)
                await wait_until(lambda: generations(guards) == [1, 1], within=5)
                await wait_until(lambda: settled(guards) and held(busy) == held(idle) == 3, 5)
                done = await load.completed_within(0.3)
            finally:
                await load.stop()
            print(f"\nslots in use at once, at most: {load.peak} of 6")
            assert load.peak <= 6
            assert all(n > 0 for n in done), done
    finally:
        await proxy.aclose()
        replica.close()


async def test_a_sync_client_is_refused_and_a_clients_own_is_left_open(redis_url: str) -> None:
    import redis

    with pytest.raises(TypeError, match=r"synchronous .* redis\.asyncio\.Redis"):
        gr.RedisCoordinator(redis.Redis.from_url(redis_url), budget=4)
    with pytest.raises(TypeError, match=r"synchronous .* redis\.asyncio\.Redis"):
        gr.RedisCache(redis.Redis.from_url(redis_url))
    with pytest.raises(TypeError, match=r"master_for\('service-name'\)"):
        gr.RedisCoordinator(redis.Sentinel([("127.0.0.1", 1)]), budget=4)
    with pytest.raises(TypeError, match="not int"):
        gr.RedisCache(6379)  # type: ignore[arg-type]
    client = Redis.from_url(redis_url)
    coordinator = gr.RedisCoordinator(client, budget=4, name=unique("own"), lease_ttl=1.0)
    guard = gr.Guardrails(concurrency=4, coordinator=coordinator)
    assert coordinator.url is None
    assert coordinator.snapshot()["redis"] == redis_url.removeprefix("redis://").removesuffix("/0")
    async with guard:  # runs the coordinator
        await wait_until(lambda: settled([guard]) and guard.limiter.limit > 0, within=5)
    assert await client.ping()  # closing the guard left the client alone
    await client.aclose()


# -- real servers on a real PostgreSQL --------------------------------------------------

BUDGET = 5
PER_PROCESS = 1
CONCURRENCY = 6
SERVERS = 3
USERS = 8
"""Users per server, each sending its next request when the last one is answered."""


@pytest.fixture(scope="module")
def small_db(pg_cluster_factory: Callable[..., PostgresServer]) -> Iterator[PostgresServer]:
    """A PostgreSQL that takes 12 connections: three pools of 6 cannot all fit."""
    server = pg_cluster_factory(max_connections=12)
    yield server
    server.close()


async def test_real_servers_stay_inside_the_budget_through_kills_restarts_stalls_and_flushes(
    small_db: PostgresServer, redis_factory: Callable[[], RedisServer]
) -> None:
    redis = redis_factory()
    app, name = unique("gr-gen"), unique("gen")
    envs = [
        server_env(
            small_db,
            f"{app}-{i}",
            redis,
            name,
            budget=BUDGET,
            per_process=PER_PROCESS,
            concurrency=CONCURRENCY,
        )
        for i in range(SERVERS)
    ]
    monitor = Monitor(small_db, interval=0.01, prefix=app)
    phase = "steady"
    ok: dict[str, int] = {}
    peaks: dict[str, int] = {}
    users_done = anyio.Event()
    monitor_done = anyio.Event()
    limits = httpx.Limits(max_connections=SERVERS * USERS + 8)

    async with servers(envs) as fleet_, httpx.AsyncClient(timeout=20, limits=limits) as client:

        async def user(server: Server) -> None:
            while not users_done.is_set():
                reply = await client.get(f"{server.url}/query")
                ok[phase] = ok.get(phase, 0) + (reply.status_code == 200)

        async def coordinators() -> list[dict[str, object]]:
            return [(await s.stats(client))["coordinator"] for s in fleet_]

        async def until(check: Callable[[list[dict[str, object]]], bool]) -> None:
            with anyio.fail_after(10):
                while not check(await coordinators()):
                    await anyio.sleep(0.05)

        async def enter(name: str) -> None:
            nonlocal phase
            peaks[phase] = max(monitor.active[marks.get(phase, 0) :], default=0)
            phase = name
            marks[name] = len(monitor.active)

        def rejoined(count: int) -> Callable[[list[dict[str, object]]], bool]:
            return lambda stats: all(
                c["mode"] == "shared" and c["generations_total"] == count for c in stats
            )

        def local(stats: list[dict[str, object]]) -> bool:
            return all(c["mode"] == "local" for c in stats)

        marks: dict[str, int] = {}
        await until(rejoined(0))
        raw = Redis.from_url(redis.url)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(monitor.run, monitor_done)
                for server in fleet_:
                    for _ in range(USERS):
                        tg.start_soon(user, server)
                await anyio.sleep(1.0)
                await enter("killed")
                redis.kill()
                await until(local)
                await anyio.sleep(1.2)  # every lease has run out: local caps
                await enter("restarted empty")
                redis.start()
                await until(rejoined(1))
                await anyio.sleep(0.5)
                await enter("restarted at once")
                redis.kill()
                redis.start()
                await until(rejoined(2))
                await anyio.sleep(0.5)
                await enter("stalled")
                redis.pause()
                await until(local)
                await anyio.sleep(1.2)
                redis.resume()
                await until(rejoined(2))
                await anyio.sleep(0.5)
                await enter("flushed")
                await raw.flushall()
                await until(rejoined(3))
                await anyio.sleep(0.5)
                await enter("done")
                users_done.set()
                monitor_done.set()
        finally:
            await raw.aclose()
            redis.close()
        counts = [(await s.stats(client))["counts"] for s in fleet_]
    print(f"\nqueries running at once, at most, per phase (budget {BUDGET}): {peaks}")
    starts = {"steady": 0, **marks}
    sampled = {p: len(monitor.active[starts[p] : starts[n]]) for p, n in pairwise(starts)}
    print(f"answered 200 per phase: {ok}; samples per phase: {sampled}")
    # The budget was watched through every phase (how densely depends on the machine).
    assert list(sampled) == list(starts)[:-1]
    assert all(n > 0 for n in sampled.values()), sampled
    assert monitor.peak_active <= BUDGET
    assert all(c["too_many"] == c["errors"] == 0 for c in counts), counts
    assert all(ok.get(p, 0) > 0 for p in marks if p != "done"), ok
