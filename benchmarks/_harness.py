"""Shared pieces of the benchmark suite: the machine, statistics, Postgres, servers, load.

The load generator here is deliberately small: raw HTTP/1.1 over asyncio streams, one
connection per request, sent at each request's scheduled time (open loop), so that the
client costs far less per request than the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from guardrails.observe.stats import percentile  # the parts use it as h.percentile

HOST = "127.0.0.1"  # loopback only: nothing here listens on or sends to anything else
ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
"""Where each part leaves its numbers as JSON for ``benchmarks/run.py`` to render."""

POOL_SIZE = 5
QUERY_SECONDS = 0.05
CAPACITY = POOL_SIZE / QUERY_SECONDS
"""Requests per second the pool can serve at best: pool_size / query_time."""


# -- statistics -------------------------------------------------------------------------


def part_main(part: ModuleType, argv: list[str] | None = None) -> int:
    """Run one benchmark part from the command line: its arguments, then its table."""
    parser = argparse.ArgumentParser(description=(part.__doc__ or "").splitlines()[0])
    part.add_arguments(parser)
    print(part.markdown(part.run(parser.parse_args(argv))))
    return 0


def ms(seconds: float) -> str:
    """Seconds as milliseconds for a table cell; a dash when there is no value."""
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (also readable as plain text on a terminal)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, data: dict[str, Any]) -> Path:
    """Write one part's results where the report generator finds them."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


# -- the machine ------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the numbers were measured on: CPU, cores, Python, library versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for dist in ("starlette", "uvicorn", "h11", "sqlalchemy", "asyncpg", "pybreaker", "anyio"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "guardrails": importlib.metadata.version("asgi-guardrails"),
        "libraries": ", ".join(versions),
    }


def raise_fd_limit() -> None:
    """Allow as many sockets as the hard limit does: open-loop load keeps many open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- PostgreSQL -------------------------------------------------------------------------


def _pgcluster() -> ModuleType:
    # The test suite's throwaway-cluster helper, loaded by path (tests/ is not a package).
    spec = importlib.util.spec_from_file_location("pgcluster", ROOT / "tests" / "pgcluster.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pgcluster"] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def postgres(*, need_control: bool = False) -> Iterator[Any]:
    """A running PostgreSQL: DATABASE_URL's, or a throwaway cluster deleted on exit.

    ``need_control`` demands a server this process may stop and start (the outage
    benchmark), which DATABASE_URL's never is.
    """
    pgcluster = _pgcluster()
    url = os.environ.get("DATABASE_URL")
    if url and not need_control:
        yield pgcluster.PostgresServer.from_url(url)
        return
    bindir = pgcluster.find_bindir()
    if bindir is None:
        raise SystemExit(pgcluster.MISSING_BINARIES)
    server = pgcluster.start_cluster(bindir, max_connections=100)
    try:
        yield server
    finally:
        server.close()


def postgres_version(server: Any) -> str:
    """``PostgreSQL 15.x`` of a suite cluster, or a note for an external server."""
    if server.cluster is None:
        return "from DATABASE_URL"
    major, minor = server.cluster.version
    return f"PostgreSQL {major}.{minor}"


# -- the server under test --------------------------------------------------------------


# No proxies, whatever the environment says: these requests stay on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Server:
    """A benchmark app (``benchmarks/app.py``) under uvicorn in a child process."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def get_json(self, path: str, timeout: float = 5.0) -> Any:
        """GET ``path`` and decode its JSON body (for the app's stats routes)."""
        with _OPENER.open(self.base + path, timeout=timeout) as response:
            return json.loads(response.read())

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])


@contextlib.contextmanager
def serve(config: dict[str, Any], log_name: str) -> Iterator[Server]:
    """Start ``benchmarks/app.py`` with ``config`` (sent on stdin, so no DSN shows in ps)."""
    RESULTS.mkdir(exist_ok=True)
    log_path = RESULTS / f"{log_name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(BENCHMARKS / "app.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            process.stdin.write(json.dumps(config).encode() + b"\n")
            process.stdin.flush()
            line = process.stdout.readline()
            if not line.strip():
                raise RuntimeError(f"benchmark server did not start:\n{log_path.read_text()}")
            server = Server(process, int(line), log_path)
            _wait_ready(server)
            yield server
        finally:
            # End of stdin asks the child to stop; a server with thousands of stuck
            # requests is not worth waiting for.
            with contextlib.suppress(OSError):
                process.stdin.close()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            server.get_json("/stats", timeout=1)
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise RuntimeError(f"benchmark server did not become ready:\n{server.log_tail()}")


# -- open-loop load ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request: when it was due, what came back, and how long from due to answer."""

    due: float
    """Seconds from the start of the run at which it was scheduled."""
    status: int | None
    """HTTP status, or None for no answer within the client's timeout or a socket error."""
    latency: float
    """Seconds from the scheduled send time to the end of the response (or giving up)."""
    lag: float
    """Seconds the client was late in starting the request: the client's own delay."""
    stale: bool = False
    """Whether the response carried ``X-Guardrails: stale``."""


async def _request(path: str, port: int, timeout: float) -> tuple[int | None, bool]:
    # One short connection per request: an open-loop client must never wait for a free
    # connection, and "Connection: close" keeps the server's and our bookkeeping trivial.
    writers: list[asyncio.StreamWriter] = []

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(HOST, port)
        writers.append(writer)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # the body, until the server closes
        return head

    try:
        head = await asyncio.wait_for(exchange(), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None, False
    finally:
        for writer in writers:
            writer.close()
    return int(head[9:12]), b"x-guardrails: stale" in head.lower()


async def open_loop(
    port: int,
    path: str,
    *,
    rate: float,
    duration: float,
    timeout: float,
    start: float | None = None,
) -> list[Outcome]:
    """Send ``GET path`` at a fixed ``rate`` for ``duration`` seconds; bounded in count and time.

    Arrivals are evenly spaced and never wait for earlier answers. Each request is
    abandoned after ``timeout`` seconds, so the whole run ends by ``duration + timeout``.
    ``start`` is the ``time.monotonic()`` of the first arrival (default: right away).
    """
    count = int(rate * duration)
    loop = asyncio.get_running_loop()
    outcomes: list[Outcome] = []

    async def one(due: float, at: float) -> None:
        lag = loop.time() - at
        status, stale = await _request(path, port, timeout)
        outcomes.append(Outcome(due, status, loop.time() - at, lag, stale))

    tasks: set[asyncio.Task[None]] = set()
    # asyncio's loop clock is time.monotonic(), which is also what ``start`` is on.
    start = loop.time() + 0.05 if start is None else start
    for i in range(count):
        due = i / rate
        at = start + due
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(due, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    outcomes.sort(key=lambda o: o.due)
    return outcomes


async def closed_loop(
    port: int, path: str, *, concurrency: int, duration: float, timeout: float
) -> list[tuple[int | None, float]]:
    """``concurrency`` clients, each sending ``GET path`` again as soon as it is answered.

    For capacity, not for overload: a closed loop slows down with the server. Returns
    (status, seconds) for each request that started within ``duration``.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    done: list[tuple[int | None, float]] = []

    async def client() -> None:
        while loop.time() < end:
            started = loop.time()
            status, _ = await _request(path, port, timeout)
            done.append((status, loop.time() - started))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done


def summary(outcomes: Sequence[Outcome], duration: float) -> dict[str, float]:
    """The figures every load part reports, from one run's outcomes."""
    ok = [o.latency for o in outcomes if o.status is not None and 200 <= o.status < 300]
    shed = [o.latency for o in outcomes if o.status == 503]
    good_ones = [
        o for o in outcomes if o.status is not None and 200 <= o.status < 300 and o.latency <= 1.0
    ]
    good = len(good_ones)
    # Answers to the last arrivals land after the arrival window: divide by the time
    # over which the good answers really came, so the tail is not counted as extra.
    span = max([duration, *(o.due + o.latency for o in good_ones)])
    return {
        "sent": len(outcomes),
        "ok": len(ok),
        "shed": len(shed),
        "other": sum(1 for o in outcomes if o.status is None or o.status not in (200, 503)),
        "no_answer": sum(1 for o in outcomes if o.status is None),
        "goodput": good / span,
        "goodput_fraction": good / span / CAPACITY,
        "ok_p50": percentile(ok, 0.5),
        "ok_p99": percentile(ok, 0.99),
        "shed_p50": percentile(shed, 0.5),
        "shed_p99": percentile(shed, 0.99),
        "past_5s": sum(1 for o in outcomes if o.latency > 5.0),
        "max": max((o.latency for o in outcomes), default=math.nan),
        "lag_p99": percentile([o.lag for o in outcomes], 0.99),
        "lag_max": max((o.lag for o in outcomes), default=math.nan),
    }
