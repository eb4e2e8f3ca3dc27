"""Throwaway redis-server processes for the tests: a free loopback port, a temp dir, no disk.

``redis_server`` is the session's shared server (tests keep apart by key names);
``redis_factory()`` starts one a test may stop and start again; :class:`Cluster` is a
three-master Redis Cluster (:func:`start_cluster`); :class:`Sentineled` a master, its
replica and a Sentinel watching them (:func:`start_sentinel`); :class:`RedisProxy`
forwards loopback connections to a server the test may swap. Without the binaries the
tests skip, or fail when GUARDRAILS_REQUIRE_REDIS=1 or GUARDRAILS_REQUIRE_POSTGRES=1 (CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pgcluster import free_port

MISSING_REDIS = "redis-server not found on PATH; install it (apt-get install redis-server)"
MISSING_CLI = "redis-cli not found on PATH (it creates the cluster); install redis-tools"


class RedisServer:
    """One redis-server on 127.0.0.1 that can be stopped and started again on its port."""

    def __init__(
        self, binary: str, port: int | None = None, *, options: tuple[str, ...] = ()
    ) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="guardrails-redis-"))
        self.options = options
        """More command-line options (``--replicaof``, ``--cluster-enabled``...)."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            *self.options,
        ]

    def start(self) -> None:
        """Start (again) on the same port; returns once it answers PING."""
        if self.running:
            return
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - kept open by the child
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer within 10 s: {self.log_tail()}")

    def ping(self) -> bool:
        return self.ask("PING").startswith("+PONG")

    def ask(self, *words: str) -> str:
        """Send one inline command and return the raw reply ("" when it fails)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(" ".join(words).encode() + b"\r\n")
                return sock.recv(65536).decode(errors="replace")
        except OSError:
            return ""

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): calls hang until :meth:`resume`, as in a stall."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server answer again (SIGCONT); it kept its data."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); its data is gone (no persistence)."""
        self.resume()  # a paused server would not act on SIGTERM
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Kill the server outright (SIGKILL), as a crash would; its data is gone."""
        self.resume()
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def log_tail(self) -> str:
        path = self.dir / "redis.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-20:])

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelServer(RedisServer):
    """A Redis Sentinel (``redis-server CONFIG --sentinel``) watching one master as ``gr``."""

    SERVICE = "gr"

    def __init__(self, binary: str, master: RedisServer) -> None:
        super().__init__(binary)
        self.config = self.dir / "sentinel.conf"
        # Sentinel rewrites its file: it lives in the server's own temp dir.
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
            f"sentinel failover-timeout {self.SERVICE} 5000\n"
        )

    def command(self) -> list[str]:
        return [self.binary, str(self.config), "--sentinel"]

    def master_port(self) -> int | None:
        """The master's port the Sentinel names now."""
        reply = self.ask("SENTINEL", "get-master-addr-by-name", self.SERVICE)
        lines = reply.split("\r\n")
        return int(lines[-2]) if len(lines) >= 5 and lines[-2].isdigit() else None

    def knows_replica(self) -> bool:
        """The Sentinel has found a replica in sync it could promote."""
        reply = self.ask("SENTINEL", "replicas", self.SERVICE)
        return "flags\r\n$5\r\nslave\r\n" in reply and "master-link-status\r\n$2\r\nok" in reply


class Sentineled:
    """A master, its replica and one Sentinel, on loopback: a failover in a few seconds."""

    def __init__(self, binary: str) -> None:
        # A replica syncs at once, not after the default 5 s wait for more replicas.
        self.master = RedisServer(binary, options=("--repl-diskless-sync-delay", "0"))
        self.replica = RedisServer(
            binary,
            options=(
                "--replicaof",
                "127.0.0.1",
                str(self.master.port),
                "--repl-diskless-sync-delay",
                "0",
            ),
        )
        self.sentinel = SentinelServer(binary, self.master)
        try:
            self.master.start()
            self.replica.start()
            # In sync before the Sentinel looks: else it learns so only at its next poll (10 s).
            _wait(self.replica_synced, 15, "the replica did not sync")
            self.sentinel.start()
            _wait(self.sentinel.knows_replica, 15, "the Sentinel did not find the replica")
        except BaseException:
            self.close()  # no server outlives a setup that failed
            raise

    def replica_synced(self) -> bool:
        return "master_link_status:up" in self.replica.ask("INFO", "replication")

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.sentinel.port)

    def fail_over(self) -> None:
        """Promote the replica (SENTINEL FAILOVER); returns once the Sentinel names it."""
        reply = self.sentinel.ask("SENTINEL", "FAILOVER", SentinelServer.SERVICE)
        assert reply.startswith("+OK"), reply
        _wait(lambda: self.sentinel.master_port() == self.replica.port, 15, "no failover")

    def close(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.close()


class Cluster:
    """Three redis-server masters on loopback joined into one Redis Cluster (no replicas)."""

    def __init__(self, binary: str, cli: str) -> None:
        options = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        )
        self.nodes = [RedisServer(binary, cluster_port(), options=options) for _ in range(3)]
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            _wait(
                lambda: all("cluster_state:ok" in n.ask("CLUSTER", "INFO") for n in self.nodes),
                30,
                "the cluster did not come up",
            )
        except BaseException:
            self.close()  # no server outlives a setup that failed
            raise

    @property
    def port(self) -> int:
        """A node's port, to start a cluster client from."""
        return self.nodes[0].port

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class RedisProxy:
    """A TCP forwarder on 127.0.0.1 in front of a redis-server; :meth:`switch` swaps it.

    Swapping cuts every connection, as a failover does, and new ones reach the new
    server: a client with a fixed URL is failed over to a server of the test's choosing.
    """

    def __init__(self, backend: int) -> None:
        self.backend = backend
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.backend)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, server_w}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        try:
            await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))
        finally:
            self._writers -= {client_w, server_w}

    def switch(self, backend: int) -> None:
        """Send new connections to ``backend``, and cut the current ones."""
        self.backend = backend
        for writer in list(self._writers):
            writer.close()

    async def aclose(self) -> None:
        self.switch(self.backend)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def cluster_port() -> int:
    """A free port P whose bus port P + 10000 is free too (so P <= 55535), for a cluster node."""
    for _ in range(200):
        port = random.randrange(20000, 45000)
        try:
            with socket.socket() as one, socket.socket() as bus:
                one.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _wait(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {within} s")
        time.sleep(0.05)


def _missing(reason: str) -> None:
    required = {
        os.environ.get(n) for n in ("GUARDRAILS_REQUIRE_REDIS", "GUARDRAILS_REQUIRE_POSTGRES")
    }
    if "1" in required:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def find_redis() -> str:
    """Path of redis-server; skips the test (or fails it, when required) without one."""
    binary = shutil.which("redis-server")
    if binary is None:
        _missing(MISSING_REDIS)
    assert binary is not None
    return binary


def start_cluster() -> Cluster:
    """A new three-master Redis Cluster; skips (or fails, when required) without binaries."""
    return Cluster(find_redis(), find_redis_cli())


def start_sentinel() -> Sentineled:
    """A new master, replica and Sentinel; skips (or fails, when required) without binaries."""
    return Sentineled(find_redis())


def find_redis_cli() -> str:
    """Path of redis-cli; skips the test (or fails it, when required) without one."""
    binary = shutil.which("redis-cli")
    if binary is None:
        _missing(MISSING_CLI)
    assert binary is not None
    return binary


@pytest.fixture(scope="session")
def redis_factory() -> Iterator[Callable[[], RedisServer]]:
    """Start redis-servers of one's own (e.g. to stop one mid-test); all closed at the end."""
    started: list[RedisServer] = []

    def factory() -> RedisServer:
        server = RedisServer(find_redis())
        started.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.close()


@pytest.fixture(scope="session")
def redis_server(redis_factory: Callable[[], RedisServer]) -> RedisServer:
    """The session's shared redis-server; tests keep apart through their key names."""
    return redis_factory()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL; restarts it first if an earlier test left it stopped."""
    redis_server.start()
    return redis_server.url
