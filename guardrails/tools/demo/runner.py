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

from guardrails.tools.demo import report, results
from guardrails.tools.demo.load import Arrival, Outcome, Profile, Progress, drive, schedule
from guardrails.tools.demo.options import (
    CAPACITY,
    JOB_INTERVAL,
    JOB_QUERY_MS,
    MAX_QUEUE,
    POOL_SIZE,
    QUEUE_TIMEOUT,
    REPORT_QUERY_MS,
    SLOW_QUERY_MS,
    STALE_TTL,
    DemoError,
    DemoOptions,
)
from guardrails.tools.demo.server import Server, ServerConfig, serve
from guardrails.tools.demo.stats import RunStats, summarize

__all__ = ["DemoResult", "run_demo"]

# Above the server's worst case (pool_timeout plus the query), so hangs are measured in
# full instead of being cut off by the client and reported as client timeouts.
_CLIENT_TIMEOUT_MARGIN = 10.0
# Longer than a round of the background job, which holds a slot while it runs.
_SETTLE_TIMEOUT = 2.0
_PROGRESS_INTERVAL = 0.2
_PLAIN_PROGRESS_INTERVAL = 3.0
_BAR_WIDTH = 24
_LOG_TAIL_LINES = 25
_POOL_TIMEOUT_LINE = "sqlalchemy.exc.TimeoutError"


@dataclass(frozen=True)
class DemoResult:
    """Everything one demo measured."""

    options: DemoOptions
    unguarded: RunStats
    guarded: RunStats
    wall: float
    """Seconds the whole demo took, both runs and their servers included."""
    unguarded_outcomes: tuple[Outcome, ...] = ()
    guarded_outcomes: tuple[Outcome, ...] = ()
    chart: Path | None = None
    """The PNG chart, or None when it could not be drawn."""
    csv: Path | None = None
    json: Path | None = None


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
        unguarded, plain = await _one_run(1, False, options, arrivals, Path(workdir), out)
        guarded, guarded_outcomes = await _one_run(2, True, options, arrivals, Path(workdir), out)
    print(file=out)
    print(report.table([unguarded, guarded]), file=out)
    print(file=out)
    print(report.conclusion(unguarded, guarded), file=out)
    for note in report.notes([unguarded, guarded]):
        print(note, file=out)
    wall = time.perf_counter() - started
    runs = [(unguarded.label, plain), (guarded.label, guarded_outcomes)]
    output = Path(options.output)
    chart = _draw(runs, profile, options, output / "demo.png", out)
    csv_path = results.write_csv(runs, output / "demo.csv")
    json_path = results.write_json(options, [unguarded, guarded], wall, output / "demo.json")
    written = ", ".join(str(p) for p in (chart, csv_path, json_path) if p is not None)
    print(f"\nwritten: {written}", file=out)
    print(f"(demo took {wall:.1f} s)", file=out)
    return DemoResult(
        options,
        unguarded,
        guarded,
        wall,
        tuple(plain),
        tuple(guarded_outcomes),
        chart,
        csv_path,
        json_path,
    )


def _draw(
    runs: list[tuple[str, list[Outcome]]],
    profile: Profile,
    options: DemoOptions,
    path: Path,
    out: TextIO,
) -> Path | None:
    try:
        from guardrails.tools.demo import chart
    except ImportError:  # pragma: no cover - matplotlib is part of the demo extra
        print("note: no chart, matplotlib is not installed", file=out)
        return None
    title = (
        f"guardrails demo: {profile.steady_rate:g} req/s from a few users, bursts of "
        f"{profile.burst_rate:g} dashboards/s; pool of {POOL_SIZE}, "
        f"pool_timeout={options.pool_timeout:g} s"
    )
    return chart.plot(runs, path, bursts=profile.bursts(), title=title)


def _print_intro(options: DemoOptions, profile: Profile, out: TextIO) -> None:
    if options.database_url is None:
        database = "a temporary SQLite file; slow queries are a sleep_ms() SQL function"
    else:
        from sqlalchemy.engine import make_url

        shown = make_url(options.database_url).render_as_string(hide_password=True)
        database = f"{shown}; slow queries are pg_sleep()"
    sqlalchemy_default = "" if options.pool_timeout == 30 else " (SQLAlchemy's default is 30 s)"
    bursts = profile.bursts()
    lines = [
        "guardrails demo: the same app under the same load, without and then with guardrails",
        "",
        f"  app    Starlette + SQLAlchemy AsyncAdaptedQueuePool, pool_size={POOL_SIZE}, "
        f"max_overflow=0, pool_timeout={options.pool_timeout:g} s{sqlalchemy_default}",
        f"         on {database}",
        f"         POST /login (fast), GET /dashboard ({SLOW_QUERY_MS} ms query), "
        f"GET /reports/{{name}} ({REPORT_QUERY_MS} ms),",
        "         GET /items/{id}, POST /items, GET /healthz; a background job holds a "
        f"connection {JOB_QUERY_MS} ms every {JOB_INTERVAL:g} s",
        f"  load   open loop, {profile.duration:g} s: a few users at {profile.steady_rate:g} "
        "req/s (login, dashboard, reports, items)",
        f"         plus {len(bursts)} burst{'s' if len(bursts) != 1 else ''} of "
        f"{profile.burst_rate:g} dashboards/s ({profile.burst_on:g} s on, "
        f"{profile.burst_off:g} s off); the pool serves ~{CAPACITY:g} dashboards/s",
        f"         Poisson arrivals (seed {options.seed}); latency counts from each "
        "request's scheduled send",
        f"  guard  Guardrails(concurrency={POOL_SIZE}, queue_timeout={QUEUE_TIMEOUT:g}, "
        f"max_queue={MAX_QUEUE}, breaker, MemoryCache), watch_pool(engine);",
        "         login critical, reports low priority one at a time, dashboard "
        f"stale_ttl={STALE_TTL:g} s,",
        "         queries through guard.read/guard.write, the job in a critical slot; "
        "/healthz exempt",
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
) -> tuple[RunStats, list[Outcome]]:
    name = "guarded" if guarded else "unguarded"
    label = "with guardrails" if guarded else "without guardrails"
    database_url = options.database_url or f"sqlite+aiosqlite:///{workdir / f'{name}.db'}"
    config = ServerConfig(database_url, options.pool_timeout, guarded)
    heading = f"  [{index}/2] {label}"
    tty = out.isatty()
    starting = f"{heading}: starting the server, then {len(arrivals):,} requests"
    out.write(f"\r\x1b[K{starting}" if tty else f"{starting}\n")
    out.flush()
    progress = Progress()
    started = time.perf_counter()
    final: dict[str, Any] = {}
    try:
        async with serve(config, workdir / f"{name}.log") as server:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_show_progress, heading, progress, options.duration, out, tty)
                outcomes = await drive(
                    server.base_url,
                    arrivals,
                    request_timeout=options.pool_timeout + _CLIENT_TIMEOUT_MARGIN,
                    progress=progress,
                )
                tg.cancel_scope.cancel()
            final = await _final_stats(server, guarded)
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
        snapshot=final.get("guardrails") if guarded else None,
        job=final.get("job"),
        duration=options.duration,
    )
    took = time.perf_counter() - started
    done = f"{heading}: {stats.sent:,} requests, done in {took:.1f} s"
    print(("\r\x1b[K" if tty else "") + done, file=out, flush=True)
    if guarded and stats.server_errors:
        # Guardrails should never let a 500 out here: show why, for whoever debugs it.
        tail = "\n".join(log[-_LOG_TAIL_LINES:])
        print(
            f"{heading}: {stats.server_errors:,} answers were 500s; the server log ends:", file=out
        )
        print(tail, file=out)
    return stats, outcomes


def progress_line(heading: str, progress: Progress, duration: float, now: float, bar: bool) -> str:
    """One line saying how far a run is: a bar for terminals, plain words otherwise."""
    elapsed = 0.0
    if progress.started_at is not None:
        elapsed = min(max(0.0, now - progress.started_at), duration)
    waiting = progress.sent - progress.done
    counts = f"sent {progress.sent:,}/{progress.total:,}, answered {progress.done:,}"
    counts += f", waiting {waiting:,}"
    if elapsed < duration:
        phase = f"{elapsed:4.1f}/{duration:g} s"
    else:
        phase = "load sent, waiting for the last answers"
    if not bar:
        return f"{heading}: {phase}, {counts}"
    filled = round(_BAR_WIDTH * elapsed / duration) if duration > 0 else _BAR_WIDTH
    return f"{heading} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {phase}  {counts}"


async def _show_progress(
    heading: str, progress: Progress, duration: float, out: TextIO, tty: bool
) -> None:
    # On a terminal one line redrawn in place; in a log a plain line every few seconds.
    interval = _PROGRESS_INTERVAL if tty else _PLAIN_PROGRESS_INTERVAL
    while True:
        await anyio.sleep(interval)
        line = progress_line(heading, progress, duration, anyio.current_time(), tty)
        out.write(f"\r\x1b[K{line}" if tty else f"{line}\n")
        out.flush()


async def _final_stats(server: Server, guarded: bool) -> dict[str, Any]:
    """The app's ``/demo/stats`` once the last slot is given back.

    The middleware releases a slot just after the last response byte, so the client can
    get its answer a moment earlier; and the background job holds a slot while a round
    runs. Wait briefly for the count to settle: a real leak still shows, because it
    never settles.
    """
    final: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5.0) as client:
        with anyio.move_on_after(_SETTLE_TIMEOUT):
            while True:
                response = await client.get("/demo/stats")
                response.raise_for_status()
                final = response.json()
                if not guarded:
                    break
                limiter = (final.get("guardrails") or {}).get("limiter") or {}
                if limiter.get("in_flight") == 0 and limiter.get("queued") == 0:
                    break
                await anyio.sleep(0.05)
    if guarded and not final.get("guardrails"):
        raise DemoError("the guarded app's /demo/stats did not report guard.snapshot()")
    return final


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
