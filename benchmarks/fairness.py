"""How fast the shared budget follows the work: one busy process, then four.

Four uvicorn servers (``tests/coordinator_app.py``) share a budget of 16 through a real
redis-server, each allowed 16 queries at once on a real PostgreSQL. Each round:

- **take**: one server gets more work than the whole budget while the other three are
  idle; measured until it holds nearly all of the budget (15 of 16) and all of it;
- **give back**: the other three get the same work; measured until the busy one holds
  no more than its fair share (4), and until every server holds its share.

Each time runs from the moment the servers themselves report the new demand (requests
queued) and is printed in seconds and as a multiple of the lease TTL, the period the
coordinator promises to act within. The slots held are read from each server's
``/stats`` every 10 ms, through a client of its own.

    .venv/bin/python benchmarks/fairness.py [--rounds 5] [--lease-ttl 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import _harness as h
import httpx
from coordinator import redis_server

SERVERS = 4
BUDGET = 16
CONCURRENCY = 16
USERS = 24
"""Users per busy server, each sending its next request when the last is answered."""
QUERY_SECONDS = 0.5
"""Long enough that a few requests a second keep every slot busy: the load generator
shares the machine with the servers, and must not be what limits the demand."""
FAIR = math.ceil(BUDGET / SERVERS)
NEARLY = BUDGET - 1
APP = h.ROOT / "tests" / "coordinator_app.py"


class Server:
    """``tests/coordinator_app.py`` under uvicorn, one process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://{h.HOST}:{self.port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", f"{APP.stem}:app"),
                *("--host", h.HOST, "--port", str(self.port), "--log-level", "warning"),
            ],
            cwd=APP.parent,
            env={**os.environ, **env, "PYTHONPATH": str(h.ROOT)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((h.HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def fleet(dsn: str, redis_url: str, lease_ttl: float) -> Iterator[list[Server]]:
    name = f"fair-{time.time_ns()}"
    started: list[Server] = []
    try:
        for index in range(SERVERS):
            env = {
                "GR_DSN": dsn,
                "GR_APP_NAME": f"gr-fair-{index}",
                "GR_CONCURRENCY": str(CONCURRENCY),
                "GR_SLEEP": str(QUERY_SECONDS),
                "GR_REDIS": redis_url,
                "GR_BUDGET": str(BUDGET),
                "GR_PER_PROCESS": str(FAIR),
                "GR_NAME": name,
                "GR_LEASE_TTL": str(lease_ttl),
                "GR_TIMEOUT": str(min(0.25, lease_ttl / 6)),
            }
            started.append(Server(env))
        yield started
    finally:
        for server in started:
            server.stop()


async def stats(client: httpx.AsyncClient, servers: list[Server]) -> list[dict[str, Any]]:
    replies = await asyncio.gather(*(client.get(f"{s.url}/stats") for s in servers))
    return [reply.json() for reply in replies]


async def until(
    client: httpx.AsyncClient,
    servers: list[Server],
    check: Callable[[list[dict[str, Any]]], bool],
    within: float = 30.0,
) -> float:
    """Monotonic time at which ``check`` first held for the servers' ``/stats``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check(await stats(client, servers)):
            return time.monotonic()
        await asyncio.sleep(0.01)
    raise RuntimeError(f"not reached within {within} s: {await stats(client, servers)}")


class Users:
    """Closed-loop users per server; a shed request is sent again 10 ms later."""

    def __init__(self) -> None:
        limits = httpx.Limits(max_connections=SERVERS * USERS)
        self.client = httpx.AsyncClient(timeout=30, limits=limits)
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False

    def start(self, server: Server, count: int) -> None:
        self.tasks += [asyncio.create_task(self._user(server)) for _ in range(count)]

    async def _user(self, server: Server) -> None:
        while not self.stopping:
            reply = await self.client.get(f"{server.url}/query")
            if reply.status_code != 200:
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.aclose()


def held(stats: list[dict[str, Any]]) -> list[int]:
    return [int(s["coordinator"]["held"] or 0) for s in stats]


def shared(stats: dict[str, Any]) -> bool:
    return bool(stats["coordinator"]["mode"] == "shared")


def queued(stats: list[dict[str, Any]]) -> list[int]:
    return [int(s["limiter"]["queued"]) for s in stats]


async def one_round(client: httpx.AsyncClient, servers: list[Server]) -> dict[str, float]:
    busy = servers[0]
    users = Users()
    try:
        users.start(busy, USERS)
        start = await until(client, servers, lambda s: queued(s)[0] > 0)
        nearly = await until(client, servers, lambda s: held(s)[0] >= NEARLY)
        full = await until(client, servers, lambda s: held(s)[0] == BUDGET)
        await asyncio.sleep(1.0)
        for server in servers[1:]:
            users.start(server, USERS)
        woken = await until(client, servers, lambda s: any(n > 0 for n in queued(s)[1:]))
        first = await until(client, servers, lambda s: all(n > 0 for n in held(s)[1:]))
        back = await until(client, servers, lambda s: held(s)[0] <= FAIR)
        shared = await until(client, servers, lambda s: all(n >= FAIR for n in held(s)[1:]))
    finally:
        await users.stop()
    return {
        "take 15 of 16": nearly - start,
        "take 16 of 16": full - start,
        "others' first slot": first - woken,
        "busy down to its share": back - woken,
        "every server at its share": shared - woken,
    }


async def measure(servers: list[Server], rounds: int, lease_ttl: float) -> dict[str, list[float]]:
    async with httpx.AsyncClient(timeout=30) as client:
        for server in servers:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await client.get(f"{server.url}/stats")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.process.poll() is not None:
                        raise
                    await asyncio.sleep(0.05)
        results: dict[str, list[float]] = {}
        for _ in range(rounds):
            # Idle and settled: every server back to its spare slots.
            await until(
                client, servers, lambda s: all(x["coordinator"]["mode"] == "shared" for x in s)
            )
            await asyncio.sleep(3 * lease_ttl)
            for key, value in (await one_round(client, servers)).items():
                results.setdefault(key, []).append(value)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    with ExitStack() as stack:
        db = stack.enter_context(h.postgres())
        url = stack.enter_context(redis_server(args.redis_url))
        servers = stack.enter_context(fleet(db.dsn("asyncpg"), url, args.lease_ttl))
        results = asyncio.run(measure(servers, args.rounds, args.lease_ttl))
    ttl = args.lease_ttl
    print(
        f"{SERVERS} servers, budget {BUDGET}, {CONCURRENCY} queries each at most, "
        f"{QUERY_SECONDS * 1000:.0f} ms queries, lease TTL {ttl:g} s, {args.rounds} rounds"
    )
    rows = [
        [
            name,
            f"{statistics.median(values):.2f} s ({statistics.median(values) / ttl:.2f} TTL)",
            f"{max(values):.2f} s ({max(values) / ttl:.2f} TTL)",
        ]
        for name, values in results.items()
    ]
    print(h.table(["from the change until", "median", "worst"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
