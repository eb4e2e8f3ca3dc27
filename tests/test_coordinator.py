"""RedisCoordinator on a real redis-server: the shared budget, the shared breaker, Redis down.

The first tests run several guards in one event loop, each with its own coordinator and
its own Redis connections, as separate processes would. The fleet tests further down run
real uvicorn servers against a real PostgreSQL with few connections.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import asyncpg
import httpx
import pytest
from fleetservers import Monitor, Server, servers
from fleetservers import server_env as fleet_env
from fleetservers import settled as settled_servers
from guardfleet import (
    Load,
    coordinator_of,
    fleet,
    held,
    recorded,
    settled,
    sharing,
    unique,
    wait_until,
)
from pgcluster import PostgresServer, free_port
from redis.asyncio import Redis
from redisserver import RedisServer

import guardrails as gr
from guardrails.breaker import Breaker
from guardrails.coordination.coordinator import RedisCoordinator
from guardrails.coordination.lua import Keys
from guardrails.coordination.shared_breaker import SharedBreaker

pytestmark = pytest.mark.anyio

TTL = 1.0


# -- construction --------------------------------------------------------------------


def test_bad_settings_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RedisCoordinator("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match=r"not a valid Redis URL .*Port"):
        RedisCoordinator("redis://127.0.0.1:abc/0", budget=5)
    with pytest.raises(ValueError, match=r"database number, e.g. /0, not /orders"):
        RedisCoordinator("redis://127.0.0.1:6379/orders", budget=5)
    with pytest.raises(ValueError, match="budget must be a whole number >= 1"):
        RedisCoordinator("redis://127.0.0.1:6379/0", budget=0)
    with pytest.raises(ValueError, match="lease_ttl"):
        RedisCoordinator("redis://127.0.0.1:6379/0", budget=5, lease_ttl=0.1)
    with pytest.raises(ValueError, match="timeout must be above 0 and below lease_ttl / 3"):
        RedisCoordinator("redis://127.0.0.1:6379/0", budget=5, lease_ttl=1.0, timeout=0.5)
    with pytest.raises(ValueError, match="needs the global budget"):
        gr.Guardrails(concurrency=4, coordinator=RedisCoordinator("redis://127.0.0.1:6379/0"))


def test_takes_the_budget_from_the_guard_and_admits_nobody_until_leased() -> None:
    budget = gr.ConnectionBudget(max_connections=40, reserved=4, processes=3)
    coordinator = RedisCoordinator("redis://127.0.0.1:1/0")
    guard = gr.Guardrails(budget=budget, coordinator=coordinator)
    assert coordinator.budget == budget.app_total
    assert coordinator.per_process == budget.per_process
    assert guard.limiter.limit == 0  # the startup window: no slot until Redis grants one
    snapshot = guard.snapshot()["coordinator"]
    assert snapshot["mode"] == "starting"
    assert "password" not in repr(snapshot)


# -- the shared budget ---------------------------------------------------------------


async def test_admitted_work_across_guards_never_exceeds_the_budget(redis_url: str) -> None:
    budget = 7
    async with fleet(redis_url, 3, budget=budget, concurrency=6, name=unique("budget")) as guards:
        peak = 0
        done = 0
        stop = False

        async def sampler() -> None:
            nonlocal peak
            while not stop:
                total = sum(g.limiter.in_flight for g in guards)
                peak = max(peak, total)
                assert total <= budget, [g.limiter.snapshot() for g in guards]
                await asyncio.sleep(0)

        async def worker(guard: gr.Guardrails) -> None:
            nonlocal done
            finished = 0
            while finished < 12:
                try:
                    async with guard.limiter.slot():
                        await asyncio.sleep(random.uniform(0.005, 0.03))
                except gr.Shed:
                    # Sustained overload: controlled delay sheds what would wait long.
                    await asyncio.sleep(0.01)
                    continue
                finished += 1
                done += 1

        watch = asyncio.create_task(sampler())
        await asyncio.gather(*(worker(g) for g in guards for _ in range(6)))
        stop = True
        await watch
        assert done == 3 * 6 * 12
        assert peak == budget  # demand was far above it: the budget was used, not wasted
        held = [coordinator_of(g).snapshot()["held"] for g in guards]
        assert sum(held) <= budget


async def test_a_busy_process_gets_the_slots_idle_ones_leave(redis_url: str) -> None:
    async with fleet(redis_url, 3, budget=6, concurrency=6, name=unique("idle")) as guards:
        busy, *idle = guards
        hold = asyncio.Event()
        admitted = 0

        async def user() -> None:
            nonlocal admitted
            async with busy.limiter.slot(gr.Priority.CRITICAL):
                admitted += 1
                await hold.wait()

        users = [asyncio.create_task(user()) for _ in range(6)]
        await wait_until(lambda: admitted == 6, within=3 * TTL)
        assert all(g.limiter.in_flight == 0 for g in idle)
        hold.set()
        await asyncio.gather(*users)


async def test_two_saturated_guards_share_the_budget(redis_url: str) -> None:
    name = unique("share")
    async with fleet(redis_url, 2, budget=6, concurrency=6, name=name) as guards:
        first, second = guards
        load = Load(guards)
        try:
            load.start(0, 10)
            # The first takes the whole budget while the second is idle...
            await wait_until(lambda: held(first) == 6, within=3)
            # ...and gives half back, for good, once the second is saturated too.
            load.start(1, 10)
            await wait_until(lambda: held(first) == 3 and held(second) == 3, within=3)
            done = await load.completed_within(1.0)
            assert [held(first), held(second)] == [3, 3]
        finally:
            await load.stop()
        assert all(n > 0 for n in done), done
        assert load.peak <= 6
        assert sum((await recorded(redis_url, name)).values()) <= 6


async def test_a_guard_short_of_slots_asks_the_others_for_theirs(redis_url: str) -> None:
    name = unique("ask")
    async with fleet(redis_url, 3, budget=6, concurrency=6, name=name) as guards:
        busy = guards[0]
        await wait_until(lambda: settled(guards), within=5)
        raw = Redis.from_url(redis_url)
        pubsub = raw.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(Keys.of(name).channel)
        load = Load(guards)
        try:
            load.start(0, 10)  # the idle guards hold spare slots the busy one needs
            with anyio.fail_after(5):
                while True:
                    message = await pubsub.get_message(timeout=1)
                    if message is not None and message["data"].startswith(b"need "):
                        break
            # Its fair share: the whole budget, as the others need none.
            assert message["data"] == f"need 6 {coordinator_of(busy).process_id}".encode()
            await wait_until(lambda: held(busy) == 6, within=5)
        finally:
            await load.stop()
            await pubsub.aclose()
            await raw.aclose()
        assert load.peak <= 6


async def test_idle_guards_neither_hold_slots_nor_shrink_the_fair_share(redis_url: str) -> None:
    # 2 busy guards and 6 idle ones: the busy ones split the budget, 8 each, not 16 / 8.
    async with fleet(redis_url, 8, budget=16, concurrency=16, name=unique("few")) as guards:
        busy = guards[:2]
        load = Load(guards)
        try:
            load.start(0, 20)
            load.start(1, 20)
            await wait_until(lambda: [held(g) for g in busy] == [8, 8], within=4)
            assert [coordinator_of(g).snapshot()["fair_share"] for g in busy] == [8, 8]
            assert all(held(g) == 0 for g in guards[2:])
        finally:
            await load.stop()
        assert load.peak <= 16


async def test_a_redis_stall_keeps_each_guard_within_its_lease(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    name = unique("stall")
    # A 3 s lease outlasts the stall by far: the budget must hold throughout.
    async with fleet(
        server.url, 2, budget=6, concurrency=6, per_process=4, name=name, lease_ttl=3.0
    ) as guards:
        load = Load(guards)
        try:
            load.start(0, 10)
            load.start(1, 10)
            # A budget new to this Redis settles for one lease TTL (3 s) first: no grants.
            await wait_until(lambda: settled(guards), within=3 * 3.0)
            await wait_until(lambda: sharing(guards, 6), within=4)
            server.pause()  # calls time out (0.25 s) and the retry too, as in a stall
            try:
                await wait_until(lambda: all(coordinator_of(g).errors_total for g in guards), 3)
                await asyncio.sleep(0.3)
            finally:
                server.resume()
            await wait_until(
                lambda: all(coordinator_of(g).snapshot()["connected"] for g in guards), 4
            )
            await wait_until(lambda: sharing(guards, 6), within=4)
            done = await load.completed_within(0.5)
        finally:
            await load.stop()
        assert load.peak <= 6  # the local cap of 4 each would have made 8
        assert all(n > 0 for n in done), done
        assert sum((await recorded(server.url, name)).values()) <= 6
    server.close()


async def test_a_closed_coordinator_admits_nobody_and_never_starts_again(redis_url: str) -> None:
    name = unique("closed")
    coordinator = RedisCoordinator(redis_url, budget=4, name=name, lease_ttl=TTL)
    guard = gr.Guardrails(concurrency=4, coordinator=coordinator)
    task = asyncio.create_task(coordinator.start())
    await wait_until(lambda: guard.limiter.limit > 0, within=2)
    await guard.aclose()
    await asyncio.wait_for(task, 2)
    assert guard.limiter.limit == 0  # no lease left, so no slot
    await asyncio.wait_for(coordinator.start(), 1)  # e.g. the middleware on a late request
    await asyncio.sleep(3 * 0.05)
    assert guard.limiter.limit == 0
    assert coordinator.process_id.encode() not in await recorded(redis_url, name)


async def test_redis_unreachable_falls_back_to_per_process_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    caplog.set_level(logging.WARNING, logger="guardrails")
    async with fleet(url, 1, budget=10, concurrency=6, per_process=2, name="down") as (guard,):
        await wait_until(lambda: guard.limiter.limit == 2, within=2)
        await wait_until(lambda: coordinator_of(guard).errors_total >= 2, within=3)
        async with guard.limiter.slot(), guard.limiter.slot():
            assert guard.limiter.try_acquire() is None  # the local cap holds
        snapshot = guard.snapshot()["coordinator"]
        assert snapshot["mode"] == "local"
        assert snapshot["connected"] is False
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]


async def test_rejoins_when_redis_comes_back(redis_factory: Callable[[], RedisServer]) -> None:
    server = redis_factory()
    async with fleet(server.url, 2, budget=4, concurrency=4, per_process=1, name="back") as guards:
        # A new Redis settles first: nobody holds a slot until then, and so none while down.
        await wait_until(lambda: settled(guards), 3)
        server.stop()
        await wait_until(lambda: all(g.limiter.limit == 1 for g in guards), within=2)
        server.start()
        await wait_until(lambda: all(coordinator_of(g).snapshot()["connected"] for g in guards), 3)
        # Back to sharing: one guard alone may now use more than its local cap.
        permits = []
        for _ in range(3):
            permits.append(await guards[0].limiter.acquire())
        assert guards[0].limiter.in_flight == 3
        for permit in permits:
            permit.release()
    server.close()


async def test_redis_down_keeps_each_guard_within_the_share_it_last_held(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    name = unique("share")
    # per_process 3 twice is more than the budget of 4: only the shares on record fit.
    async with fleet(server.url, 2, budget=4, concurrency=4, per_process=3, name=name) as guards:
        busy, idle = guards
        await wait_until(lambda: settled(guards), within=3 * TTL)
        load = Load(guards)
        try:
            load.start(0, 8)
            await wait_until(lambda: held(busy) == 4 and held(idle) == 0, within=5)
            server.stop()
            load.start(1, 8)  # demand arrives where Redis had no slot on record
            # Once its lease has run out each keeps min(its share, per_process): 3 and 0.
            await wait_until(lambda: busy.limiter.limit == 3, within=5)
            shares = [coordinator_of(g).snapshot()["share"] for g in guards]
            assert shares == [4, 0]
            assert idle.limiter.limit == 0
            done = list(load.done)
            await wait_until(lambda: load.done[0] >= done[0] + 20, within=5)
            assert busy.limiter.limit == 3
            assert idle.limiter.limit == 0
        finally:
            await load.stop()
        assert load.peak <= 4  # per_process each would have run 6
        assert load.done[1] == 0
    server.close()


# -- the shared breaker --------------------------------------------------------------


async def refused() -> None:
    """A real outage: the database driver refused by a port nobody listens on."""
    await asyncpg.connect(host="127.0.0.1", port=free_port(), user="x", timeout=2)


async def call_through(breaker: Breaker, call: Callable[[], Awaitable[None]]) -> None:
    """Make one call the way guarded calls do: admitted by the breaker, outcome recorded."""
    trial = breaker.admit()
    try:
        await call()
    except BaseException as exc:
        breaker.record(trial, exc)
        raise
    breaker.record(trial)


async def test_an_open_breaker_is_seen_by_every_guard_and_one_trial_closes_it(
    redis_url: str,
) -> None:
    settings = gr.BreakerSettings(fail_max=1, reset_timeout=0.5)
    async with fleet(
        redis_url, 3, budget=6, concurrency=2, name=unique("breaker"), breaker=settings
    ) as guards:
        await wait_until(lambda: all(coordinator_of(g).snapshot()["connected"] for g in guards), 2)
        first, *others = guards
        with pytest.raises(ConnectionRefusedError):
            await call_through(first.breaker, refused)
        assert first.breaker.state == "open"
        # That it arrives; how soon depends on the machine's load and is not asserted.
        await wait_until(lambda: all(g.breaker.state == "open" for g in others), within=5)
        for guard in others:
            with pytest.raises(gr.Unavailable):
                guard.breaker.admit()
        # After the open period, every guard keeps asking; exactly one is let through.
        trials: list[tuple[gr.Guardrails, gr.breaker.Trial]] = []

        def ask() -> bool:
            for guard in guards:
                try:
                    trial = guard.breaker.admit()
                except gr.Unavailable:
                    continue
                assert trial is not None
                trials.append((guard, trial))
            return bool(trials)

        await wait_until(ask, within=3)
        await asyncio.sleep(0.3)
        ask()
        assert len(trials) == 1
        owner, trial = trials[0]
        owner.breaker.record(trial)  # the trial succeeded: the database is back
        assert owner.breaker.state == "closed"
        await wait_until(lambda: all(g.breaker.state == "closed" for g in guards), within=1)
        half_open = [g.telemetry.breaker_transitions.get("half_open", 0) for g in guards]
        assert sum(half_open) == 1  # one trial for the fleet, not one per process


def test_a_renewal_answered_before_a_trial_closed_the_breaker_does_not_reopen_it() -> None:
    breaker = Breaker(gr.BreakerSettings(fail_max=1, reset_timeout=30.0))
    shared = SharedBreaker(breaker, "me", Keys.of("race"), lambda: None)
    opening = "1700000000000:other"
    shared.on_message(f"open 0 other {opening}".encode())  # another process opened it
    assert breaker.state == "open"
    breaker.hold = False  # its open period is over and this process has the trial lock
    trial = breaker.admit()
    assert breaker.state == "half_open"
    breaker.record(trial)  # the database answered
    assert breaker.state == "closed"
    assert shared.pending == "closed"  # to be told at the next exchange
    # A renewal sent before the trial ended comes back with the opening still on record:
    # it is older than this process's news, which Redis has not heard yet.
    shared.reconcile(0, opening)
    assert breaker.state == "closed"
    assert shared.pending == "closed"
    assert breaker.transitions == 3  # open, half_open, closed: one trial


async def test_an_opening_before_the_first_lease_is_told_to_the_others(redis_url: str) -> None:
    settings = gr.BreakerSettings(fail_max=1, reset_timeout=30.0)
    name = unique("early")
    first, second = (
        gr.Guardrails(
            concurrency=2,
            breaker=settings,
            coordinator=RedisCoordinator(redis_url, budget=4, name=name, lease_ttl=TTL),
        )
        for _ in range(2)
    )
    # The breaker opens before the coordinator has ever reached Redis.
    with pytest.raises(ConnectionRefusedError):
        await call_through(first.breaker, refused)
    assert first.breaker.state == "open"
    tasks = [asyncio.create_task(coordinator_of(g).start()) for g in (first, second)]
    try:
        await wait_until(lambda: coordinator_of(first).snapshot()["connected"], within=3)
        await wait_until(lambda: second.breaker.state == "open", within=3)
    finally:
        for guard in (first, second):
            await guard.aclose()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_stale_close_after_an_outage_leaves_a_newer_opening_alone(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    name = unique("stale")
    settings = gr.BreakerSettings(fail_max=1, reset_timeout=0.3)
    key = f"guardrails:{{{name}}}:breaker"
    # The first guard's loop is ours to pause, as a process that comes back late would.
    first = gr.Guardrails(
        concurrency=2,
        breaker=settings,
        coordinator=RedisCoordinator(server.url, budget=4, name=name, lease_ttl=TTL),
    )
    loop = asyncio.create_task(coordinator_of(first).start())
    raw = Redis.from_url(server.url)
    try:
        async with fleet(server.url, 1, budget=4, concurrency=2, name=name, breaker=settings) as (
            second,
        ):
            await wait_until(
                lambda: all(coordinator_of(g).snapshot()["connected"] for g in (first, second)),
                within=2,
            )
            with pytest.raises(ConnectionRefusedError):
                await call_through(first.breaker, refused)
            await wait_until(lambda: second.breaker.state == "open", within=1)
            server.stop()
            await wait_until(lambda: not coordinator_of(first).snapshot()["connected"], 3)
            await wait_until(lambda: not coordinator_of(second).snapshot()["connected"], 3)
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            # Locally now: the first's trial starts; the second's trial fails and reopens.
            trial = first.breaker.admit()
            assert trial is not None
            await anyio.sleep(0.35)
            with pytest.raises(ConnectionRefusedError):
                await call_through(second.breaker, refused)
            assert second.breaker.state == "open"
            server.start()  # empty: only the second is there to tell it of its opening
            with anyio.fail_after(5):
                while coordinator_of(second).process_id.encode() not in (await raw.get(key) or b""):
                    await anyio.sleep(0.02)
            # The first comes back having missed that news, its trial still running.
            loop = asyncio.create_task(coordinator_of(first).start())
            await wait_until(lambda: coordinator_of(first).snapshot()["connected"], within=3)
            await anyio.sleep(0.3)  # time to tell Redis again of the opening it knew
            assert first.breaker.state == "half_open"
            first.breaker.record(trial)  # the trial succeeded, for the old opening only
            assert first.breaker.state == "closed"
            await anyio.sleep(0.5)
            assert second.breaker.state == "open"
            assert coordinator_of(second).process_id.encode() in (await raw.get(key) or b"")
            # The first follows the opening on record again.
            await wait_until(lambda: first.breaker.state == "open", within=2)
    finally:
        await first.aclose()
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await raw.aclose()
        server.close()


# -- a fleet of real servers on a real PostgreSQL with few connections -------------------

MAX_CONNECTIONS = 12
BUDGET = 5
PER_PROCESS = 1
CONCURRENCY = 6
SERVERS = 3


def server_env(
    db: PostgresServer, app_name: str, redis: RedisServer | None, name: str
) -> dict[str, str]:
    return fleet_env(
        db,
        app_name,
        redis,
        name,
        budget=BUDGET,
        per_process=PER_PROCESS,
        concurrency=CONCURRENCY,
    )


@pytest.fixture(scope="module")
def storm_db(pg_cluster_factory: Callable[..., PostgresServer]) -> Iterator[PostgresServer]:
    """A PostgreSQL that takes 12 connections: three pools of 6 cannot all fit."""
    server = pg_cluster_factory(max_connections=MAX_CONNECTIONS)
    yield server
    server.close()


@pytest.fixture(scope="module")
def fleet_redis(redis_factory: Callable[[], RedisServer]) -> RedisServer:
    return redis_factory()


@pytest.fixture(scope="module")
async def coordinated(
    storm_db: PostgresServer, fleet_redis: RedisServer
) -> AsyncIterator[list[Server]]:
    """Three servers sharing a budget of 5 through Redis (their own pools hold up to 6)."""
    name = unique("fleet")
    envs = [server_env(storm_db, f"gr-fleet-{i}", fleet_redis, name) for i in range(SERVERS)]
    async with servers(envs) as started, httpx.AsyncClient(timeout=10) as client:
        await settled_servers(started, client)
        yield started


async def burst(fleet: list[Server], per_server: int) -> list[httpx.Response]:
    """``per_server`` requests sent at once to each server, the replies in server order."""
    limits = httpx.Limits(max_connections=len(fleet) * per_server)
    async with httpx.AsyncClient(timeout=20, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(client.get(f"{s.url}/query") for s in fleet for _ in range(per_server))
            )
        )


async def totals(fleet: list[Server]) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=10) as client:
        stats = [await s.stats(client) for s in fleet]
    return {key: sum(s["counts"][key] for s in stats) for key in ("ok", "too_many", "errors")}


def shed_only(replies: list[httpx.Response]) -> bool:
    """Every reply a 200 or a 503 the guard gave for overload (a shed), nothing else."""
    return all(
        r.status_code == 200 or (r.status_code == 503 and r.json()["error"] == "overloaded")
        for r in replies
    )


async def test_storm_without_a_coordinator_overruns_the_database(
    storm_db: PostgresServer,
) -> None:
    envs = [server_env(storm_db, f"gr-alone-{i}", None, "") for i in range(SERVERS)]
    async with servers(envs) as fleet:
        before = await totals(fleet)
        await burst(fleet, 18)
        after = await totals(fleet)
    too_many = after["too_many"] - before["too_many"]
    print(f"\nwithout coordinator: {too_many} 'too many connections' errors")
    assert too_many > 0


async def test_storm_with_the_coordinator_stays_inside_the_budget(
    storm_db: PostgresServer, coordinated: list[Server]
) -> None:
    monitor = Monitor(storm_db)
    stop = anyio.Event()
    before = await totals(coordinated)
    async with anyio.create_task_group() as tg:
        tg.start_soon(monitor.run, stop)
        replies = await burst(coordinated, 18)
        stop.set()
    after = await totals(coordinated)
    ok = sum(r.status_code == 200 for r in replies)
    print(
        f"\nwith coordinator: {ok}/{len(replies)} ok, peak {monitor.peak_active} queries "
        f"running and {monitor.peak_open} connections open (budget {BUDGET}, "
        f"{monitor.samples} samples)"
    )
    assert after["too_many"] == before["too_many"]
    assert after["errors"] == before["errors"]
    assert shed_only(replies)
    assert after["ok"] - before["ok"] == ok
    # The budget is shared, not taken by whichever server leased first.
    per_server = [replies[i * 18 : (i + 1) * 18] for i in range(SERVERS)]
    assert all(any(r.status_code == 200 for r in mine) for mine in per_server)
    assert monitor.samples > 10
    assert 0 < monitor.peak_active <= BUDGET
    # One idle connection per process is kept by its pool on top of the running ones.
    assert monitor.peak_open <= BUDGET + SERVERS


async def test_redis_stopped_mid_load_sheds_no_more_than_usual_and_rejoins(
    storm_db: PostgresServer, fleet_redis: RedisServer, coordinated: list[Server]
) -> None:
    replies: list[httpx.Response] = []
    ok = {server.port: 0 for server in coordinated}
    ok_down = {server.port: 0 for server in coordinated}
    phase = ""
    fallback: dict[int, int] = {}
    """Each server's slots once its lease has run out: min(its last share, PER_PROCESS)."""
    monitor = Monitor(storm_db)
    stop = anyio.Event()
    before = await totals(coordinated)

    async def user(client: httpx.AsyncClient, server: Server) -> None:
        while phase != "done":
            sent_down = phase == "down"
            reply = await client.get(f"{server.url}/query")
            replies.append(reply)
            ok[server.port] += reply.status_code == 200
            if sent_down and phase == "down" and reply.status_code == 200:
                ok_down[server.port] += 1  # sent and answered while Redis was down

    async def connected(client: httpx.AsyncClient) -> bool:
        stats = [await s.stats(client) for s in coordinated]
        return all(s["coordinator"]["connected"] for s in stats)

    async with httpx.AsyncClient(timeout=20) as client, anyio.create_task_group() as tg:
        tg.start_soon(monitor.run, stop)
        phase = "up"
        for server in coordinated:
            for _ in range(4):
                tg.start_soon(user, client, server)
        await anyio.sleep(0.5)
        fleet_redis.stop()
        phase = "down"
        # Each server keeps within the share it last held while its lease stands, then
        # within both that share and PER_PROCESS: never more than Redis had on record, so
        # the fleet stays inside the budget. A share of 0 (a server whose demand came while
        # the others held the budget) stays 0: nobody can grant it a slot meanwhile.
        with anyio.fail_after(10):
            while len(fallback) < len(coordinated):
                seen = [(await s.stats(client))["coordinator"] for s in coordinated]
                for server, c in zip(coordinated, seen, strict=True):
                    assert c["limit"] <= c["share"], c  # within its record, always
                    if not c["connected"] and c["limit"] == min(c["share"], PER_PROCESS):
                        fallback[server.port] = c["limit"]
                if not any(c["connected"] for c in seen):
                    # Shares no longer change: Redis had no more than the budget on record.
                    assert sum(c["share"] for c in seen) <= BUDGET, seen
                await anyio.sleep(0.05)
        # The servers with a slot serve through the outage.
        with anyio.fail_after(10):
            while any(ok_down[port] == 0 for port, n in fallback.items() if n):
                await anyio.sleep(0.05)
        fleet_redis.start()
        phase = "back"
        with anyio.fail_after(5):
            while not await connected(client):
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        phase = "done"
        stop.set()
    after = await totals(coordinated)
    print(f"\nslots each server kept while Redis was down: {list(fallback.values())}")
    assert sum(fallback.values()) > 0
    assert 0 < monitor.peak_active <= BUDGET  # the queries running, counted by PostgreSQL
    assert shed_only(replies), {r.status_code for r in replies}
    assert after["too_many"] == before["too_many"]
    assert after["errors"] == before["errors"]
    assert sum(r.status_code == 200 for r in replies) > 10
    assert all(n > 0 for n in ok.values()), ok  # every server served


async def test_an_open_breaker_reaches_every_server_through_redis(
    coordinated: list[Server],
) -> None:
    first, *others = coordinated
    async with httpx.AsyncClient(timeout=10) as client:
        before = [await s.stats(client) for s in coordinated]
        assert (await client.get(f"{first.url}/down")).status_code == 503
        opened = anyio.current_time()
        # The others open on the first one's news (pub/sub, the renewal as a backstop),
        # not on failures of their own: they made no database call meanwhile. How long it
        # took is printed; the bound only stops a hang.
        with anyio.fail_after(5):
            while True:
                now = [await s.stats(client) for s in others]
                if all(s["breaker"]["state"] == "open" for s in now):
                    break
        seen = anyio.current_time() - opened
        for b, a in zip(before[1:], now, strict=True):
            assert (
                a["coordinator"]["remote_opens_total"] == b["coordinator"]["remote_opens_total"] + 1
            )
            assert a["counts"] == b["counts"]
        refused = await client.get(f"{others[0].url}/query")
        assert refused.status_code == 503
        assert refused.json()["error"] == "unavailable"
        # After the open period one server makes the trial; it succeeds and all close.
        with anyio.fail_after(5):
            while True:
                await asyncio.gather(*(client.get(f"{s.url}/query") for s in coordinated))
                after = [await s.stats(client) for s in coordinated]
                if all(s["breaker"]["state"] == "closed" for s in after):
                    break
                await anyio.sleep(0.05)
    print(f"\nbreaker open in the other servers {seen * 1000:.0f} ms after the first opened")
    trials = sum(
        a["transitions"].get("half_open", 0) - b["transitions"].get("half_open", 0)
        for a, b in zip(after, before, strict=True)
    )
    assert trials == 1


async def test_a_killed_worker_gives_its_slots_back_within_the_lease_ttl(
    storm_db: PostgresServer, fleet_redis: RedisServer, coordinated: list[Server]
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        name = (await coordinated[0].stats(client))["coordinator"]["name"]
    env = server_env(storm_db, "gr-victim", fleet_redis, name)
    env["GR_SLEEP"] = "5"  # its requests hold their slots until it dies
    async with servers([env]) as (victim,), httpx.AsyncClient(timeout=30) as client:
        load = [asyncio.create_task(client.get(f"{victim.url}/query")) for _ in range(CONCURRENCY)]
        with anyio.fail_after(5):
            while (await victim.stats(client))["limiter"]["in_flight"] < 3:
                await anyio.sleep(0.05)
        process = (await victim.stats(client))["coordinator"]["process"]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        killed = anyio.current_time()
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        raw = Redis.from_url(fleet_redis.url)
        try:
            # The survivors' renewals drop the dead lease once it has expired.
            with anyio.fail_after(5):
                while True:
                    held = await raw.hgetall(f"guardrails:{{{name}}}:held")
                    if process.encode() not in held:
                        break
                    await anyio.sleep(0.02)
        finally:
            await raw.aclose()
        returned = anyio.current_time() - killed
        # And a survivor under steady load can now lease the whole budget.
        first = coordinated[0]
        done = False

        async def user() -> None:
            while not done:
                await client.get(f"{first.url}/query")

        users = [asyncio.create_task(user()) for _ in range(CONCURRENCY + 2)]
        try:
            with anyio.fail_after(5):
                while ((await first.stats(client))["coordinator"]["held"] or 0) < BUDGET:
                    await anyio.sleep(0.02)
        finally:
            done = True
            await asyncio.gather(*users)
    print(f"\nkilled worker's slots back after {returned * 1000:.0f} ms (lease ttl {TTL} s)")
    # The lease expires within TTL of the kill, and an idle survivor's renewal (every
    # TTL / 3) drops it; the rest is slack for a busy machine.
    assert returned <= TTL + TTL / 3 + 1.0
