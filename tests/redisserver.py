"""Throwaway redis-server processes for the tests: a free loopback port, a temp dir, no disk.

``redis_server`` is the session's shared server (tests keep apart by key names);
``redis_factory()`` starts one a test may stop and start again. Without the binary the
tests skip, or fail when GUARDRAILS_REQUIRE_REDIS=1 or GUARDRAILS_REQUIRE_POSTGRES=1 (CI).
"""

from __future__ import annotations

import os
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


class RedisServer:
    """One redis-server on 127.0.0.1 that can be stopped and started again on its port."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="guardrails-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (again) on the same port; returns once it answers PING."""
        if self.running:
            return
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - kept open by the child
        self.process = subprocess.Popen(
            [
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
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
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
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

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

    def log_tail(self) -> str:
        path = self.dir / "redis.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-20:])

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def find_redis() -> str:
    """Path of redis-server; skips the test (or fails it, when required) without one."""
    binary = shutil.which("redis-server")
    if binary is None:
        required = {
            os.environ.get(n) for n in ("GUARDRAILS_REQUIRE_REDIS", "GUARDRAILS_REQUIRE_POSTGRES")
        }
        if "1" in required:
            pytest.fail(MISSING_REDIS, pytrace=False)
        pytest.skip(MISSING_REDIS)
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
