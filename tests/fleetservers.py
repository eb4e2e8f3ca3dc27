"""Real uvicorn servers running tests/coordinator_app.py, and a pg_stat_activity sampler.

Shared by the fleet tests of the coordinator: each server is its own process with its
own pool and guard; :class:`Monitor` counts, server-side, the queries they run at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
from pgcluster import PostgresServer, free_port
from redisserver import RedisServer

APP = Path(__file__).with_name("coordinator_app.py")


class Server:
    """One uvicorn process running tests/coordinator_app.py on a loopback port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A file, not a pipe: a server logging more than a pipe holds would block.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                f"{APP.stem}:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=APP.parent,
            env={**os.environ, **env, "PYTHONPATH": str(APP.parent.parent)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def stats(self, client: httpx.AsyncClient) -> dict[str, Any]:
        reply = await client.get(f"{self.url}/stats")
        reply.raise_for_status()
        result: dict[str, Any] = reply.json()
        return result

    async def ready(self, client: httpx.AsyncClient) -> None:
        with anyio.fail_after(30):
            while True:
                if self.process.poll() is not None:
                    self.log.seek(0)
                    raise RuntimeError(f"server exited: {self.log.read()[-2000:]!r}")
                try:
                    await self.stats(client)
                    return
                except httpx.TransportError:
                    await anyio.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def server_env(
    db: PostgresServer,
    app_name: str,
    redis: RedisServer | None,
    name: str,
    *,
    budget: int,
    per_process: int,
    concurrency: int,
    sleep: float = 0.1,
) -> dict[str, str]:
    """The environment of one server: its database, its guard, and its share of the budget."""
    env = {
        "GR_DSN": db.dsn("asyncpg"),
        "GR_APP_NAME": app_name,
        "GR_CONCURRENCY": str(concurrency),
        "GR_SLEEP": str(sleep),
        "GR_REFUSING_PORT": str(free_port()),
    }
    if redis is not None:
        env |= {
            "GR_REDIS": redis.url,
            "GR_BUDGET": str(budget),
            "GR_PER_PROCESS": str(per_process),
            "GR_NAME": name,
        }
    return env


@asynccontextmanager
async def servers(envs: list[dict[str, str]]) -> AsyncIterator[list[Server]]:
    """Start one server per environment; all stopped when the block ends."""
    started = [Server(env) for env in envs]
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for server in started:
                await server.ready(client)
        yield started
    finally:
        for server in started:
            server.stop()


async def settled(fleet: list[Server], client: httpx.AsyncClient, within: float = 10) -> None:
    """Wait until every server shares the budget through Redis, past any settling period."""
    with anyio.fail_after(within):
        while True:
            stats = [(await s.stats(client))["coordinator"] for s in fleet]
            if all(c["mode"] == "shared" for c in stats):
                return
            await anyio.sleep(0.05)


class Monitor:
    """Samples pg_stat_activity: queries running and connections open, from the fleet.

    The queries running at once, counted by the server itself, are the ground truth of
    a budget: what the guards believe plays no part in it.
    """

    def __init__(self, db: PostgresServer, interval: float = 0.005, prefix: str = "gr-") -> None:
        self.db = db
        self.interval = interval
        self.prefix = prefix
        self.peak_active = 0
        self.peak_open = 0
        self.samples = 0
        self.active: list[int] = []
        """Every sample of the queries running, in order."""

    async def run(self, stop: anyio.Event) -> None:
        conn = await asyncpg.connect(self.db.dsn())
        try:
            while not stop.is_set():
                row = await conn.fetchrow(
                    "SELECT count(*) FILTER (WHERE state = 'active') AS active, count(*) AS open"
                    " FROM pg_stat_activity WHERE application_name LIKE $1"
                    " AND pid <> pg_backend_pid()",
                    self.prefix + "%",
                )
                assert row is not None
                self.active.append(row["active"])
                self.peak_active = max(self.peak_active, row["active"])
                self.peak_open = max(self.peak_open, row["open"])
                self.samples += 1
                await anyio.sleep(self.interval)
        finally:
            await conn.close()
