"""Outbound calls: GuardedTransport against the bare AsyncHTTPTransport, on a real loopback server.

Three measurements, all in one run:

- overhead: sequential GETs over keep-alive to a uvicorn upstream in a child process,
  through a bare ``httpx.AsyncHTTPTransport`` and through ``GuardedTransport`` around
  the same kind of transport (also inside a request deadline, which adds the deadline
  cap and the time-left header), interleaved round by round; medians and ratios;
- a dead origin (a closed port): connection attempts made by 1000 calls, one after
  another and 1000 at once (``max_concurrency=10``), counted by a transport wrapper;
- the deadline: calls to an upstream that answers after 1 s, inside a request with
  0.1 s left: how long after the deadline the call raised.

    .venv/bin/python benchmarks/outbound.py [--calls 500] [--rounds 9]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import _harness as h
import httpx

import guardrails as gr
from guardrails import context

TARGET = 1.10
"""Guarded per-call time over bare, on loopback (where the network costs least)."""


async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The upstream: ``ok`` at once, or after ``?seconds=S``."""
    if scope["type"] != "http":
        return
    seconds = parse_qs(scope["query_string"].decode()).get("seconds")
    if seconds:
        await asyncio.sleep(float(seconds[0]))
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def serve_upstream() -> Iterator[str]:
    """``upstream`` under uvicorn in a child process on loopback; its port read from stdout."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=h.ROOT,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        line = process.stdout.readline()
        if not line.strip():
            raise RuntimeError("the upstream did not start")
        url = f"http://{h.HOST}:{int(line)}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the upstream did not answer") from None
                time.sleep(0.05)
        yield url
    finally:
        process.stdin.close()  # end of stdin: the child stops
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_child() -> None:
    """The child: print the port, serve until stdin ends."""
    import threading

    import uvicorn

    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it each keep-alive answer (head and body in two writes) waits ~40 ms for a
    # delayed ACK, which would swamp what is measured here.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((h.HOST, 0))
    print(sock.getsockname()[1], flush=True)
    server = uvicorn.Server(
        uvicorn.Config(
            upstream,
            lifespan="off",
            log_level="warning",
            access_log=False,
            interface="asgi3",
            timeout_graceful_shutdown=1,
        )
    )

    def stop_at_end_of_stdin() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=stop_at_end_of_stdin, daemon=True).start()
    server.run(sockets=[sock])
    sock.close()


class Counting(httpx.AsyncBaseTransport):
    """The real AsyncHTTPTransport, counting the requests handed to it."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.attempts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _guarded(guard: gr.Guardrails, name: str, inner: httpx.AsyncBaseTransport) -> Any:
    return gr.GuardedTransport(
        inner,
        guard=guard,
        name=name,
        breaker=gr.BreakerSettings(fail_max=5, reset_timeout=30),
        retry=gr.RetrySettings(attempts=3),
        max_concurrency=20,
        deadline_header="x-deadline-ms",
    )


async def overhead(url: str, calls: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call for each case, one value per round."""
    guard = gr.Guardrails(concurrency=4)
    clients = {
        "bare": httpx.AsyncClient(transport=httpx.AsyncHTTPTransport()),
        "guarded": httpx.AsyncClient(
            transport=_guarded(guard, "guarded", httpx.AsyncHTTPTransport())
        ),
        "guarded, in a request with a deadline": httpx.AsyncClient(
            transport=_guarded(guard, "deadline", httpx.AsyncHTTPTransport())
        ),
    }
    samples: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for http in clients.values():  # warm up: connections made, code paths hot
            for _ in range(50):
                await http.get(url)
        names = list(clients)
        for round_ in range(rounds):
            order = names if round_ % 2 == 0 else names[::-1]
            for name in order:
                http = clients[name]
                token = None
                if "deadline" in name:
                    deadline = asyncio.get_running_loop().time() + 3600
                    token = context.enter(context.CallContext("/bench", deadline=deadline))
                try:
                    started = time.perf_counter()
                    for _ in range(calls):
                        await http.get(url)
                    samples[name].append((time.perf_counter() - started) / calls)
                finally:
                    if token is not None:
                        context.leave(token)
    finally:
        for http in clients.values():
            await http.aclose()
    return samples


async def dead_origin(calls: int) -> dict[str, int]:
    """Connection attempts that ``calls`` calls to a closed port made."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((h.HOST, 0))  # bound, never listening: every connection is refused
    url = f"http://{h.HOST}:{sock.getsockname()[1]}/"
    results: dict[str, int] = {}
    try:
        guard = gr.Guardrails(concurrency=4)
        for name, limit in (("one after another", None), ("all at once", 10)):
            counting = Counting()
            transport = gr.GuardedTransport(
                counting,
                guard=guard,
                name=name,
                breaker=gr.BreakerSettings(fail_max=5, reset_timeout=30),
                retry=gr.RetrySettings(attempts=3),
                max_concurrency=limit,
                queue_timeout=5,
            )
            async with httpx.AsyncClient(transport=transport) as http:

                async def call(client: httpx.AsyncClient = http) -> None:
                    with contextlib.suppress(httpx.ConnectError, gr.OriginUnavailable):
                        await client.get(url)

                if limit is None:
                    for _ in range(calls):
                        await call()
                else:
                    await asyncio.gather(*(call() for _ in range(calls)))
            results[name] = counting.attempts
    finally:
        sock.close()
    return results


async def deadline_lateness(url: str, calls: int, left: float) -> list[float]:
    """Seconds past the deadline at which each call to a 1 s upstream raised."""
    late: list[float] = []
    guard = gr.Guardrails(concurrency=4)
    transport = gr.GuardedTransport(guard=guard)
    async with httpx.AsyncClient(transport=transport, timeout=30) as http:
        for _ in range(calls):
            deadline = asyncio.get_running_loop().time() + left
            token = context.enter(context.CallContext("/bench", deadline=deadline))
            try:
                await http.get(url + "/?seconds=1")
            except gr.OriginUnavailable:
                late.append(asyncio.get_running_loop().time() - deadline)
            finally:
                context.leave(token)
    return late


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=500, help="calls per case per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure; return (and save) medians, ratios, attempt counts and lateness."""
    with serve_upstream() as url:
        samples = asyncio.run(overhead(url, args.calls, args.rounds))
        late = asyncio.run(deadline_lateness(url, 20, 0.1))
    attempts = asyncio.run(dead_origin(1000))
    bare = statistics.median(samples["bare"])
    results: dict[str, Any] = {
        "calls": args.calls,
        "rounds": args.rounds,
        "target": TARGET,
        "cases": {
            name: {
                "median_us": statistics.median(values) * 1e6,
                "ratio": statistics.median(values) / bare,
                "added_us": (statistics.median(values) - bare) * 1e6,
            }
            for name, values in samples.items()
        },
        "dead_origin_attempts": attempts,
        "deadline_late_ms": {
            "calls": len(late),
            "p50": h.percentile(late, 0.5) * 1000,
            "max": max(late) * 1000,
        },
    }
    h.save("outbound", results)
    return results


def markdown(results: dict[str, Any]) -> str:
    rows = [
        [name, f"{case['median_us']:.0f}", f"{case['added_us']:+.0f}", f"{case['ratio']:.3f}x"]
        for name, case in results["cases"].items()
    ]
    dead = results["dead_origin_attempts"]
    late = results["deadline_late_ms"]
    return "\n".join(
        [
            f"Sequential GETs over keep-alive to uvicorn on loopback, {results['rounds']} "
            f"interleaved rounds x {results['calls']} calls per case, medians.",
            "",
            h.table(["case", "us/call", "added us", "ratio to bare"], rows),
            "",
            "Dead origin (closed port), fail_max=5, attempts=3: connection attempts made by "
            "1000 calls: " + ", ".join(f"{name}: {count}" for name, count in dead.items()) + ".",
            "",
            f"Deadline: {late['calls']} calls to a 1 s upstream with 0.1 s left raised "
            f"{late['p50']:.1f} ms (median), {late['max']:.1f} ms (max) after the deadline.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    if (argv if argv is not None else sys.argv[1:]) == ["--serve"]:
        serve_child()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.getLogger("guardrails").setLevel(logging.ERROR)
    results = run(parser.parse_args(argv))
    print(markdown(results))
    ratio = results["cases"]["guarded"]["ratio"]
    print(f"guarded: {ratio:.3f}x bare (target <= {TARGET}x)")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
