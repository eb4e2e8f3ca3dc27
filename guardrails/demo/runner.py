"""Runs the whole demo: the same seeded load against the app without and then with guardrails.

Owns the order of events, the progress line and what is printed; ``run_demo`` also returns
every figure as data (``DemoResult``) so tests assert on numbers, not on text.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import anyio
import httpx

from guardrails.demo import report
from guardrails.demo.load import Arrival, Profile, Progress, drive, schedule
from guardrails.demo.options import (
    CAPACITY,
    MAX_QUEUE,
    POOL_SIZE,
    QUEUE_TIMEOUT,
    SLOW_QUERY_MS,
    DemoError,
    DemoOptions,
)
from guardrails.demo.server import Server, ServerConfig, serve
from guardrails.demo.stats import RunStats, summarize

__all__ = ["DemoResult", "run_demo"]

# Above the server's worst case (pool_timeout plus the query), so hangs are measured in
# full instead of being cut off by the client and reported as client timeouts.
_CLIENT_TIMEOUT_MARGIN = 10.0
_SETTLE_TIMEOUT = 1.0
_PROGRESS_INTERVAL = 0.2
_POOL_TIMEOUT_LINE = "sqlalchemy.exc.TimeoutError"


@dataclass(frozen=True)
class DemoResult:
    """Everything one demo measured."""

    options: DemoOptions
    unguarded: RunStats
    guarded: RunStats
    wall: float
    """Seconds the whole demo took, both runs and their servers included."""


def run_demo(args: argparse.Namespace | DemoOptions, out: TextIO | None = None) -> DemoResult:
    """Run both variants, print the table to ``out`` (stdout by default), return the data."""
    options = args if isinstance(args, DemoOptions) else DemoOptions.from_args(args)
    stream = out if out is not None else sys.stdout
    return anyio.run(_run_demo, options, stream)


async def _run_demo(options: DemoOptions, out: TextIO) -> DemoResult:
    started = time.perf_counter()
    profile = Profile(duration=options.duration, burst_rate=options.rate)
    arrivals = schedule(profile, options.seed)
    # Each outstanding request holds a socket in the client and one in the server child.
    _raise_open_file_limit(2 * len(arrivals) + 256)
    _print_intro(options, profile, out)
    with tempfile.TemporaryDirectory(prefix="guardrails-demo-") as workdir:
        unguarded = await _one_run(1, False, options, arrivals, Path(workdir), out)
        guarded = await _one_run(2, True, options, arrivals, Path(workdir), out)
    print(file=out)
    print(report.table([unguarded, guarded]), file=out)
    print(file=out)
    print(report.conclusion(unguarded, guarded), file=out)
    for note in report.notes([unguarded, guarded]):
        print(note, file=out)
    wall = time.perf_counter() - started
    print(f"(demo took {wall:.1f} s)", file=out)
    return DemoResult(options, unguarded, guarded, wall)


def _print_intro(options: DemoOptions, profile: Profile, out: TextIO) -> None:
    if options.database_url is None:
        database = "a temporary SQLite file; the slow query is a sleep_ms() SQL function"
    else:
        from sqlalchemy.engine import make_url

        shown = make_url(options.database_url).render_as_string(hide_password=True)
        database = f"{shown}; the slow query is pg_sleep()"
    sqlalchemy_default = "" if options.pool_timeout == 30 else " (SQLAlchemy's default is 30 s)"
    lines = [
        "guardrails demo: the same app under the same load, without and then with guardrails",
        "",
        f"  app    Starlette + SQLAlchemy AsyncAdaptedQueuePool, pool_size={POOL_SIZE}, "
        "max_overflow=0,",
        f"         pool_timeout={options.pool_timeout:g} s{sqlalchemy_default}",
        f"         on {database}",
        f"         GET /dashboard holds a connection for {SLOW_QUERY_MS} ms, "
        f"so the pool serves ~{CAPACITY:.0f} of them/s",
        f"  load   open loop, {profile.duration:g} s: {profile.steady_rate:g} req/s of mixed "
        f"reads and writes all along,",
        f"         plus a burst of {profile.burst_rate:g} req/s on GET /dashboard "
        f"from {profile.burst_start:g} s on",
        f"         Poisson arrivals (seed {options.seed}); latency counts from each "
        "request's scheduled send",
        f"  guard  Guardrails(concurrency={POOL_SIZE}, queue_timeout={QUEUE_TIMEOUT}, "
        f"max_queue={MAX_QUEUE}); GET /healthz exempt",
        "",
    ]
    print("\n".join(lines), file=out)


async def _one_run(
    index: int,
    guarded: bool,
    options: DemoOptions,
    arrivals: list[Arrival],
    workdir: Path,
    out: TextIO,
) -> RunStats:
    name = "guarded" if guarded else "unguarded"
    label = "with guardrails" if guarded else "without guardrails"
    database_url = options.database_url or f"sqlite+aiosqlite:///{workdir / f'{name}.db'}"
    config = ServerConfig(database_url, options.pool_timeout, guarded)
    heading = f"  [{index}/2] {label}"
    tty = out.isatty()
    starting = f"{heading}: starting the server and sending {len(arrivals):,} requests"
    out.write(f"\r\x1b[K{starting}" if tty else f"{starting}\n")
    out.flush()
    progress = Progress()
    started = time.perf_counter()
    snapshot: dict[str, Any] | None = None
    try:
        async with serve(config, workdir / f"{name}.log") as server:
            async with anyio.create_task_group() as tg:
                if tty:
                    tg.start_soon(_show_progress, heading, progress, options.duration, out)
                outcomes = await drive(
                    server.base_url,
                    arrivals,
                    request_timeout=options.pool_timeout + _CLIENT_TIMEOUT_MARGIN,
                    progress=progress,
                )
                tg.cancel_scope.cancel()
            if guarded:
                snapshot = await _settled_snapshot(server)
    except BaseException:
        if tty:  # end the progress line, so an error message starts on a line of its own
            out.write("\n")
        raise
    # The child has exited, so its log is complete: each pool timeout left a traceback.
    log = server.log_text().splitlines()
    pool_timeouts = sum(1 for line in log if line.startswith(_POOL_TIMEOUT_LINE))
    stats = summarize(
        label,
        outcomes,
        guarded=guarded,
        pool_timeout=options.pool_timeout,
        pool_timeouts=pool_timeouts,
        snapshot=snapshot,
    )
    took = time.perf_counter() - started
    done = f"{heading}: {stats.sent:,} requests, done in {took:.1f} s"
    print(("\r\x1b[K" if tty else "") + done, file=out, flush=True)
    return stats


async def _show_progress(heading: str, progress: Progress, duration: float, out: TextIO) -> None:
    while True:
        elapsed = 0.0
        if progress.started_at is not None:
            elapsed = min(anyio.current_time() - progress.started_at, duration)
        phase = f"{elapsed:4.1f}/{duration:g} s" if elapsed < duration else "draining"
        waiting = progress.sent - progress.done
        out.write(
            f"\r\x1b[K{heading}  {phase}  sent {progress.sent:,}/{progress.total:,}"
            f"  answered {progress.done:,}  waiting {waiting:,}"
        )
        out.flush()
        await anyio.sleep(_PROGRESS_INTERVAL)


async def _settled_snapshot(server: Server) -> dict[str, Any]:
    """The guard's snapshot once the last slot is given back.

    The middleware releases a slot just after the last response byte, so the client can
    get its answer a moment earlier: wait briefly for the count to settle. A real leak
    still shows, because it never settles.
    """
    snapshot: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5.0) as client:
        with anyio.move_on_after(_SETTLE_TIMEOUT):
            while True:
                response = await client.get("/healthz")
                response.raise_for_status()
                snapshot = response.json().get("guardrails") or {}
                limiter = snapshot.get("limiter") or {}
                if limiter.get("in_flight") == 0 and limiter.get("queued") == 0:
                    break
                await anyio.sleep(0.05)
    if not snapshot:
        raise DemoError("the guarded app's /healthz did not report guard.snapshot()")
    return snapshot


def _raise_open_file_limit(wanted: int) -> None:
    """Lift the soft limit on open files toward ``wanted`` (macOS defaults to 256)."""
    try:
        import resource
    except ImportError:  # Windows has no such limit to lift
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
