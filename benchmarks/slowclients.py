"""Slow clients against real uvicorn: legit goodput with 20 slow-body or 20 slow-reading
clients on ``concurrency=10``, against the same legit load alone, in the same run.

Each scenario starts a fresh server (``benchmarks/slow_app.py``, library defaults) in a
child process; legit traffic is open-loop at 60% of capacity. Slow-body clients announce
a 1000-byte POST body and send a byte every 0.5 s; slow readers ask for a large page (8
MiB, sent at once) or a large stream, and never read it. All reconnect when let go, so
20 are at it throughout.

    .venv/bin/python benchmarks/slowclients.py [--pythonpath DIR] [--duration 6]

``--pythonpath`` points the server at another checkout of guardrails (e.g. an older one)
for a before/after comparison on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import _harness as h

ATTACKERS = 20
RATE = 0.6 * 10 / 0.05  # 60% of 10 slots x 1 / 50 ms


@contextlib.contextmanager
def server(pythonpath: str | None, *, watch: bool = True) -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((h.HOST, 0))
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ)
    paths = [str(h.BENCHMARKS)] + ([pythonpath] if pythonpath else [])
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env["SLOW_APP_WATCH"] = "1" if watch else "0"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "slow_app:app",
            "--host",
            h.HOST,
            "--port",
            str(port),
            "--log-level",
            "critical",
            "--no-access-log",
        ],
        env=env,
        cwd=pythonpath or h.ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((h.HOST, port), 0.2):
                break
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)


async def slow_body(port: int, stop: float) -> None:
    while time.monotonic() < stop:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            reader, writer = await asyncio.open_connection(h.HOST, port)
            writer.write(b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            try:
                for _ in range(1000):
                    if time.monotonic() >= stop or reader.at_eof():
                        break
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(0.5)
            finally:
                writer.close()
        await asyncio.sleep(0.05)


async def slow_reader(port: int, stop: float, path: str) -> None:
    while time.monotonic() < stop:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (h.HOST, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 12)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            try:
                while time.monotonic() < stop and not reader.at_eof():  # noqa: ASYNC110
                    await asyncio.sleep(0.2)  # never reads: the server's sends block
            finally:
                writer.close()
        await asyncio.sleep(0.05)


async def scenario(port: int, attack: str | None, duration: float) -> dict[str, float]:
    stop = time.monotonic() + duration + 1.0
    attackers = []
    if attack == "slow body":
        attackers = [asyncio.create_task(slow_body(port, stop)) for _ in range(ATTACKERS)]
    elif attack is not None:
        path = "/page" if attack == "slow reader, big page" else "/big"
        attackers = [asyncio.create_task(slow_reader(port, stop, path)) for _ in range(ATTACKERS)]
    if attackers:
        await asyncio.sleep(1.0)  # let them take hold first
    outcomes = await h.open_loop(port, "/work", rate=RATE, duration=duration, timeout=5.0)
    for task in attackers:
        task.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    ok = sum(1 for o in outcomes if o.status == 200)
    return {"sent": len(outcomes), "ok": ok, "ok_fraction": ok / len(outcomes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pythonpath", help="checkout of guardrails the server runs")
    parser.add_argument("--duration", type=float, default=6.0)
    args = parser.parse_args()
    h.raise_fd_limit()
    rows = []
    results: dict[str, dict[str, float]] = {}
    for attack in (None, "slow body", "slow reader, big page", "slow reader, stream"):
        with server(args.pythonpath) as port:
            results[attack or "none"] = asyncio.run(scenario(port, attack, args.duration))
    # Without a watched pool guardrails cannot tell that a stalled stream holds no
    # connection: only send_timeout lets it go.
    with server(args.pythonpath, watch=False) as port:
        results["slow reader, stream, pool not watched"] = asyncio.run(
            scenario(port, "slow reader, stream", args.duration)
        )
    base = results["none"]["ok_fraction"]
    for name, found in results.items():
        rows.append(
            [name, int(found["sent"]), int(found["ok"]), f"{found['ok_fraction'] / base:.2f}"]
        )
    print(h.table(["slow clients", "legit sent", "legit 200", "goodput vs none"], rows))
    h.save("slowclients", {"results": results, "target": 0.9})


if __name__ == "__main__":
    main()
