"""A real HTTP upstream for the outbound tests: uvicorn on 127.0.0.1, in a thread of its own.

What it does is chosen by the path, for any method (a request body is read in full
first):

- ``/ok``: 200 ``ok``;
- ``/status/{code}``: that status; ``?retry_after=N`` adds ``Retry-After: N``;
- ``/flaky/{key}?fail=N&status=503``: the first ``N`` requests to ``key`` get ``status``
  (``&retry_after=N`` adds the header), the rest 200;
- ``/gate/{key}``: waits until the test calls ``open_gate(key)``, then 200;
- ``/slow?seconds=S``: 200 after ``S`` seconds;
- ``/drip/{key}``: 200 and the body's first part at once, the rest when the gate opens;
- ``/headers``: 200 with the request's headers as JSON.

Every request is counted by path as it arrives (``hits``, ``arrivals`` on the monotonic
clock, ``bodies``) and when answered (``answered``). ``Upstream(listen=False)`` binds its
port without listening, so connections are refused until ``start()``; never started, it
is a closed port no one else can take.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

import uvicorn

HOST = "127.0.0.1"


class Upstream:
    """One upstream server (or a closed port), stopped by :meth:`stop`."""

    def __init__(self, *, listen: bool = True) -> None:
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say so,
        # and without it a keep-alive answer sent in two writes waits for a delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind((HOST, 0))
        self.port: int = self.sock.getsockname()[1]
        self.hits: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.arrivals: dict[str, list[float]] = {}
        self.bodies: dict[str, list[bytes]] = {}
        self._flaky: Counter[str] = Counter()
        self._gates: dict[str, asyncio.Event] = {}
        self._opened: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        if listen:
            self.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen and serve (until now, connections to the port were refused)."""
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=1,
            access_log=False,
            interface="asgi3",
        )
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the upstream server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Open every gate, stop serving, free the port."""
        for key in list(self._gates):
            self.open_gate(key)
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self.sock.close()

    def open_gate(self, key: str) -> None:
        """Let the requests waiting at ``/gate/{key}`` (and later ones) through."""
        self._opened.add(key)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._gate(key).set)

    def _gate(self, key: str) -> asyncio.Event:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = asyncio.Event()
            if key in self._opened:
                gate.set()
        return gate

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self._loop = asyncio.get_running_loop()
        path: str = scope["path"]
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.hits[path] += 1
        self.arrivals.setdefault(path, []).append(time.monotonic())
        self.bodies.setdefault(path, []).append(body)
        query = {k: v[-1] for k, v in parse_qs(scope["query_string"].decode()).items()}
        status, headers, content = 200, [], b"ok"
        parts = path.strip("/").split("/")
        if parts[0] == "status":
            status = int(parts[1])
        elif parts[0] == "flaky":
            self._flaky[path] += 1
            if self._flaky[path] <= int(query.get("fail", "1")):
                status = int(query.get("status", "503"))
            else:
                query.pop("retry_after", None)
        elif parts[0] == "gate":
            await self._gate(parts[1]).wait()
        elif parts[0] == "slow":
            await asyncio.sleep(float(query["seconds"]))
        elif parts[0] == "drip":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part 1, ", "more_body": True})
            await self._gate(parts[1]).wait()
            await send({"type": "http.response.body", "body": b"part 2"})
            self.answered[path] += 1
            return
        elif parts[0] == "headers":
            content = json.dumps({k.decode(): v.decode() for k, v in scope["headers"]}).encode()
        if "retry_after" in query:
            headers.append((b"retry-after", query["retry_after"].encode()))
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        self.answered[path] += 1
