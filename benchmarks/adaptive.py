"""Adaptive limit: CPU-bound queries on a small database, fixed concurrency 20 vs adaptive.

Both servers have a SQLAlchemy pool of 20 and ``Guardrails(concurrency=20)``; the second
adds ``adaptive=gr.AdaptiveLimit()`` with the library's defaults. The route runs
``SELECT bench_work(N)``, a SQL function around ``select count(*) from
generate_series(1, N)``, with N calibrated so that one query takes about 20 ms of CPU
(its time alone). First capacity is measured: queries/s at the best concurrency, closed
loop, straight to PostgreSQL and through the fixed server; the second, which includes
the app's own CPU on the same machine, is what the load is a multiple of. Then each
server gets, open loop:

1. calm: 0.5x capacity, so the adaptive limit learns its baseline;
2. contention: 2x capacity;
3. recovery: back to 0.5x capacity;
4. outside slowdown, still at 0.5x: for 10 s the benchmark redefines ``bench_work``
   from its own connection to ``pg_sleep`` 30 ms before counting, then restores it.

The app records the limit every 100 ms and each adaptive window; the chart goes to
docs/adaptive.png.

    .venv/bin/python benchmarks/adaptive.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _harness as h
import asyncpg
from adaptive_report import (
    RECOVERED,
    SLOTS,
    SLOW_SLEEP,
    STEADY_AFTER,
    VARIANTS,
    in_span,
    load_figures,
    markdown,  # noqa: F401 - a part's table, for run.py and h.part_main
    plot,
    reached,
    settled_after,
    windows_until,
)

QUERY_ALONE = 0.020
"""What one query alone should take, once N is calibrated."""
CALM, OVERLOAD = 0.5, 2.0
"""Load as multiples of the measured capacity."""
LEVELS = (1, 2, 3, 4, 6, 8, 12, 20)
"""Concurrencies at which the database's capacity is measured."""
CHART = h.ROOT / "docs" / "adaptive.png"

WORK = "CREATE OR REPLACE FUNCTION bench_work(n int) RETURNS bigint LANGUAGE sql AS $$ {} $$"
NORMAL = WORK.format("select count(*) from generate_series(1, n)")
SLOWED = WORK.format(f"select pg_sleep({SLOW_SLEEP}); select count(*) from generate_series(1, n)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calm", type=float, default=5.0, help="seconds at 0.5x first")
    parser.add_argument("--overload", type=float, default=15.0, help="seconds at 2x capacity")
    parser.add_argument("--recovery", type=float, default=16.0, help="seconds at 0.5x after it")
    parser.add_argument("--slowdown", type=float, default=10.0, help="seconds slowed from outside")
    parser.add_argument("--after", type=float, default=10.0, help="seconds at 0.5x after that")
    parser.add_argument("--chart", type=Path, default=CHART, help="where to draw the chart")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an experiment: give AdaptiveLimit this setting (the benchmark uses the defaults)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: shorter phases, fewer capacity levels"
    )


# -- the database -----------------------------------------------------------------------


async def _timed(conn: asyncpg.Connection, n: int, times: int) -> float:
    """Seconds of CPU one ``bench_work(n)`` takes, or of wall time if that cannot be read.

    CPU time, read from the backend's /proc entry, is what a query takes alone whatever
    else the machine runs; wall time is only that on an idle machine, so the fastest of
    a few is taken then.
    """
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    before = _cpu_seconds(pid)
    took = []
    for _ in range(times):
        started = time.perf_counter()
        await conn.fetchval("SELECT bench_work($1)", n)
        took.append(time.perf_counter() - started)
    after = _cpu_seconds(pid)
    if before is None or after is None:
        return min(took)
    return (after - before) / times


def _cpu_seconds(pid: int) -> float | None:
    """User and system CPU seconds of process ``pid`` (None: not on this machine)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _calibrate(dsn: str) -> tuple[int, float]:
    """N such that ``bench_work(N)`` alone takes about ``QUERY_ALONE``, and what it took."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(NORMAL)
        n = 100_000
        await _timed(conn, n, 3)  # warm up
        for _ in range(3):
            n = max(1000, round(n * QUERY_ALONE / await _timed(conn, n, 25)))
        return n, await _timed(conn, n, 50)
    finally:
        await conn.close()


async def _capacity(dsn: str, n: int, levels: Sequence[int], seconds: float) -> dict[str, Any]:
    """Queries/s and mean query time at each concurrency, closed loop, straight to the database."""
    conns = [await asyncpg.connect(dsn) for _ in range(max(levels))]
    by_level: dict[int, dict[str, float]] = {}
    try:
        for level in levels:
            done: list[float] = []
            end = time.monotonic() + seconds

            async def worker(
                conn: asyncpg.Connection, end: float = end, done: list[float] = done
            ) -> None:
                while time.monotonic() < end:
                    started = time.perf_counter()
                    await conn.fetchval("SELECT bench_work($1)", n)
                    done.append(time.perf_counter() - started)

            started = time.monotonic()
            await asyncio.gather(*(worker(c) for c in conns[:level]))
            took = time.monotonic() - started
            by_level[level] = {"qps": len(done) / took, "mean": statistics.fmean(done)}
            await asyncio.sleep(0.2)
    finally:
        for conn in conns:
            await conn.close()
    return _best(by_level)


def _best(by_level: dict[int, dict[str, float]]) -> dict[str, Any]:
    best = max(by_level, key=lambda level: by_level[level]["qps"])
    return {"qps": by_level[best]["qps"], "best_concurrency": best, "levels": by_level}


def _through_app(app: h.Server, levels: Sequence[int], seconds: float) -> dict[str, Any]:
    """The same, through the fixed server's HTTP route (its limit 20 is above every level)."""
    by_level: dict[int, dict[str, float]] = {}
    for level in levels:
        done = asyncio.run(
            h.closed_loop(app.port, "/query", concurrency=level, duration=seconds, timeout=5.0)
        )
        ok = [took for status, took in done if status == 200]
        by_level[level] = {"qps": len(ok) / seconds, "mean": statistics.fmean(ok or [math.nan])}
        time.sleep(0.2)
    return _best(by_level)


# -- one server under the scenario -----------------------------------------------------


async def _scenario(
    port: int, dsn: str, capacity: float, args: argparse.Namespace
) -> tuple[list[h.Outcome], list[h.Outcome], dict[str, float]]:
    """Calm, 2x, calm, a slowdown from outside; returns both streams and the phase times."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.1
    total = args.calm + args.overload + args.recovery + args.slowdown + args.after
    slow_at = args.calm + args.overload + args.recovery
    marks = {"start": start}
    conn = await asyncpg.connect(dsn)

    async def slow_down() -> None:
        await asyncio.sleep(start + slow_at - loop.time())
        await conn.execute(SLOWED)
        marks["slowed"] = loop.time()
        await asyncio.sleep(start + slow_at + args.slowdown - loop.time())
        await conn.execute(NORMAL)
        marks["restored"] = loop.time()

    try:
        base, extra, _ = await asyncio.gather(
            h.open_loop(
                port, "/query", rate=CALM * capacity, duration=total, timeout=8.0, start=start
            ),
            h.open_loop(
                port,
                "/query",
                rate=(OVERLOAD - CALM) * capacity,
                duration=args.overload,
                timeout=8.0,
                start=start + args.calm,
            ),
            slow_down(),
        )
    finally:
        await conn.execute(NORMAL)
        await conn.close()
    # The extra stream's due times count from its own start: shift them onto the run's.
    extra = [h.Outcome(o.due + args.calm, o.status, o.latency, o.lag, o.stale) for o in extra]
    return base, extra, marks


def _measure(app: h.Server, dsn: str, capacity: float, args: argparse.Namespace) -> dict[str, Any]:
    app.get_json("/stats/reset")
    base, extra, marks = asyncio.run(_scenario(app.port, dsn, capacity, args))
    stats = app.get_json("/stats?trace=1")
    outcomes = sorted(base + extra, key=lambda o: o.due)
    start = marks["start"]
    over_end = args.calm + args.overload
    slow_at = over_end + args.recovery
    slow_end = slow_at + args.slowdown

    def due(lo: float, hi: float) -> list[h.Outcome]:
        return [o for o in outcomes if lo <= o.due < hi]

    windows = [{**w, "at": w["ended"] - start} for w in stats["windows"]]

    def limits(lo: float, hi: float) -> list[int]:
        return [w["after"] for w in windows if lo <= w["at"] < hi]

    over = limits(args.calm, over_end)
    recovery = limits(over_end, slow_at)
    slowed = limits(slow_at, slow_end)
    after = [w for w in windows if w["at"] >= slow_end]
    ceiling = stats["limiter"]["configured_limit"]
    second_half = limits(args.calm + args.overload / 2, over_end)
    back = windows_until([w["after"] for w in after], RECOVERED * ceiling) if windows else None
    holds = [w["short"] for w in in_span(windows, args.calm + start, over_end + start)]
    return {
        "calm": load_figures(due(0, args.calm), args.calm),
        "overload": load_figures(due(args.calm, over_end), args.overload),
        "recovery": load_figures(due(over_end, slow_at), args.recovery),
        "slowdown": load_figures(due(slow_at, slow_end), args.slowdown),
        "after": load_figures(due(slow_end, math.inf), args.after),
        "slowed": [marks["slowed"] - start, marks["restored"] - start],
        "windows_overload": len(over),
        "settled_after": settled_after(over) if windows else None,
        "reached_after": reached(over) if windows else None,
        "steady": load_figures(
            due(args.calm + STEADY_AFTER, over_end), args.overload - STEADY_AFTER
        ),
        "limit_overload": statistics.median(second_half) if second_half else ceiling,
        "limit_overload_min": min(over, default=ceiling),
        "recovered_after": windows_until(recovery, RECOVERED * ceiling) if windows else None,
        # The lowest point counts the windows after the slowdown until the limit is back:
        # windows that end just after it still hold slowed samples.
        "slow_low": min(
            slowed + [w["after"] for w in after[: back or len(after)]], default=ceiling
        ),
        "slow_back_after": back,
        "slow_back_seconds": None if back is None else after[back - 1]["at"] - slow_end,
        "baseline": windows[-1]["baseline"] if windows else None,
        "short_overload": statistics.median([x for x in holds if x]) if holds else None,
        "windows_missed": windows[-1]["index"] - len(windows) if windows else 0,
        "limiter": stats["limiter"],
        "trace": [
            [t - start, limit, flying, queued] for t, limit, flying, queued in stats["trace"]
        ],
        "windows": windows,
        "points": [[round(o.due, 4), o.status, round(o.latency, 5)] for o in outcomes],
        "server_lag_p99": h.percentile(stats.get("lag", []), 0.99),
    }


def _settings(pairs: Sequence[str]) -> dict[str, float]:
    """``--setting name=value`` pairs as keyword arguments for AdaptiveLimit."""
    settings: dict[str, float] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        settings[name] = int(value) if value.isdigit() else float(value)
    return settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate, measure capacity, run both servers; return (and save) the results."""
    if args.quick:
        args.calm, args.overload, args.recovery, args.slowdown, args.after = 3, 6, 8, 4, 5
    h.raise_fd_limit()
    results: dict[str, Any] = {
        "slots": SLOTS,
        "phases": {
            "calm": args.calm,
            "overload": args.overload,
            "recovery": args.recovery,
            "slowdown": args.slowdown,
            "after": args.after,
        },
        "slow_sleep": SLOW_SLEEP,
        "settings": _settings(args.setting),
        "runs": {},
    }
    with h.postgres() as server:
        dsn = server.dsn()
        results["postgres"] = h.postgres_version(server)
        n, alone = asyncio.run(_calibrate(dsn))
        levels = (1, 2, 4, 20) if args.quick else LEVELS
        seconds = 1.0 if args.quick else 1.5
        database = asyncio.run(_capacity(dsn, n, levels, seconds))
        results.update(n=n, query_alone=alone, database=database)
        qps = math.nan
        for variant in VARIANTS:
            config = {
                "variant": "guardrails",
                "dsn": server.dsn("asyncpg"),
                "pool_size": SLOTS,
                "concurrency": SLOTS,
                "work": n,
                "adaptive": variant == "adaptive" and (_settings(args.setting) or True),
            }
            with h.serve(config, f"adaptive-{variant}") as app:
                if variant == "fixed":
                    capacity = results["capacity"] = _through_app(app, levels, seconds)
                    qps = capacity["qps"]
                    print(
                        f"  N={n}: {alone * 1000:.1f} ms of CPU; capacity {qps:.0f}/s through "
                        f"the app at concurrency {capacity['best_concurrency']} (database "
                        f"alone: {database['qps']:.0f}/s at {database['best_concurrency']})",
                        file=sys.stderr,
                    )
                r = _measure(app, dsn, qps, args)
                r["load_average"] = os.getloadavg()
            results["runs"][variant] = r
            o = r["overload"]
            print(
                f"  {variant}: overload {o['goodput']:.0f} 2xx/s, p99 {h.ms(o['ok_p99'])} ms, "
                f"{o['shed']} shed; limit {r['limit_overload']}, settled after "
                f"{r['settled_after']}, recovered after {r['recovered_after']}, "
                f"slowdown low {r['slow_low']}, back after {r['slow_back_after']}",
                file=sys.stderr,
            )
    results["chart"] = str(plot(results, args.chart))
    h.save("adaptive", results)
    return results


def main(argv: list[str] | None = None) -> int:
    return h.part_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
