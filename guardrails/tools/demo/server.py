"""Runs the example app under real uvicorn on 127.0.0.1, in a child process of the demo.

A separate process keeps the server off the load generator's GIL and file-descriptor table,
so what is measured is the app, not the two fighting. Owns both ends: ``serve()`` starts
and stops the child, and ``python -m guardrails.tools.demo.server`` is the child.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from guardrails.tools.demo.options import DemoError

__all__ = ["Server", "ServerConfig", "serve"]

_HOST = "127.0.0.1"  # loopback only: the demo never listens on or sends to anything else
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class ServerConfig:
    """What the child needs to build the app; sent over stdin so a password never shows in ps."""

    database_url: str
    pool_timeout: float
    guarded: bool


@dataclass(frozen=True)
class Server:
    """A running child server."""

    base_url: str
    log_path: Path

    def log_text(self) -> str:
        """What the server has written to stderr so far (uvicorn's log, tracebacks)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@asynccontextmanager
async def serve(config: ServerConfig, log_path: Path) -> AsyncIterator[Server]:
    """Start the app in a child process, wait until it answers, and stop it on exit."""
    with log_path.open("wb") as log:
        process = await anyio.open_process(
            [sys.executable, "-m", "guardrails.tools.demo.server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        async with process:
            assert process.stdin is not None
            assert process.stdout is not None
            try:
                await process.stdin.send(json.dumps(asdict(config)).encode() + b"\n")
                try:
                    with anyio.fail_after(_START_TIMEOUT):
                        line = await BufferedByteReceiveStream(process.stdout).receive_until(
                            b"\n", 100
                        )
                except (anyio.EndOfStream, anyio.IncompleteRead, TimeoutError) as exc:
                    raise DemoError(_start_failure("did not start", log_path)) from exc
                server = Server(f"http://{_HOST}:{int(line)}", log_path)
                await _wait_until_ready(server, process)
                yield server
            except BaseException:
                # Interrupted or failed: no request is worth waiting for any more.
                _kill(process)
                raise
            finally:
                # End of stdin is the child's signal to shut down gracefully; it works the
                # same on every OS and also fires if this process dies.
                await process.stdin.aclose()
                with anyio.move_on_after(_STOP_TIMEOUT, shield=True):
                    await process.wait()
                _kill(process)


def _kill(process: Process) -> None:
    """Kill the child unless it has already exited (e.g. its app failed to start)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


async def _wait_until_ready(server: Server, process: Process) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=2.0) as client:
        with anyio.move_on_after(_START_TIMEOUT):
            while process.returncode is None:
                try:
                    response = await client.get("/healthz")
                except httpx.TransportError:
                    pass
                else:
                    if response.status_code == 200:
                        return
                await anyio.sleep(0.05)
    raise DemoError(_start_failure("did not become ready", server.log_path))


def _start_failure(what: str, log_path: Path) -> str:
    log = log_path.read_text(encoding="utf-8", errors="replace")
    tail = "\n".join(log.strip().splitlines()[-15:])
    return f"the demo server {what}; its log ends with:\n{tail or '(nothing)'}"


def _main() -> None:
    import uvicorn

    from guardrails.tools.demo.app import create_app, make_engine

    config = ServerConfig(**json.loads(sys.stdin.readline()))
    engine = make_engine(config.database_url, pool_timeout=config.pool_timeout)
    app = create_app(engine, guarded=config.guarded)
    uv_config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        # Far above the demo's concurrency: refusing connections would hide the hang.
        backlog=4096,
    )
    serve_child(uvicorn.Server(uv_config))


def serve_child(server: Any) -> None:
    """Run a ``uvicorn.Server`` as a child process: print its port, stop at end of stdin.

    The parent reads the port from the first line of stdout and closes stdin to stop it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((_HOST, 0))  # the OS picks a free port: no race with anything else
    print(sock.getsockname()[1], flush=True)
    # From now on stdout goes to the log too, so nothing can fill the parent's pipe.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def stop_at_end_of_stdin() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=stop_at_end_of_stdin, daemon=True).start()
    server.run(sockets=[sock])
    sock.close()


if __name__ == "__main__":
    _main()
