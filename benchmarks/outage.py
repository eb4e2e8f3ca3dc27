"""Outage: PostgreSQL stopped under load, then started again, behind guardrails.

The server is guarded (breaker with ``fail_max`` 5, a 2 s open period and a probe that
connects straight to the server, never through the pool) and its route serves the last
good response as a stale fallback. Load runs open-loop all along; the database is
stopped (``pg_ctl stop -m fast``) and started again in the middle.

Then *recovery with the ready probe*: the same server with ``reset_timeout=30``, the
library's default ``probe_interval`` and ``probe=gr.ping(engine)``; the database is
stopped for ``--down-for`` seconds under light load and started again, ``--runs``
times. Measured: seconds from ``pg_ctl start`` returning to the breaker closed, against
the 2 s target, and requests that reached the handler while it was not closed (a user
request spent on a trial would show there).

    .venv/bin/python benchmarks/outage.py [--rate 100] [--down-at 3] [--up-at 8]
        [--down-for 10] [--runs 3] [--recovery-only]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from typing import Any

import _harness as h

RESET_TIMEOUT = 2.0
RECOVERY_RESET_TIMEOUT = 30.0
RECOVERY_TARGET = 2.0
"""Seconds from the database accepting connections to the breaker closed (design target)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=h.CAPACITY, help="requests per second")
    parser.add_argument("--down-at", type=float, default=3.0, help="stop Postgres at (s)")
    parser.add_argument("--up-at", type=float, default=8.0, help="start Postgres again at (s)")
    parser.add_argument("--duration", type=float, default=13.0, help="seconds of arrivals")
    parser.add_argument(
        "--down-for", type=float, default=10.0, help="recovery runs: seconds the database is down"
    )
    parser.add_argument("--runs", type=int, default=3, help="recovery runs with the ready probe")
    parser.add_argument(
        "--recovery-only", action="store_true", help="only the recovery runs (ready probe)"
    )


async def _scenario(app: h.Server, server: Any, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2
    load = loop.create_task(
        h.open_loop(
            app.port, "/query", rate=args.rate, duration=args.duration, timeout=5.0, start=t0
        )
    )
    await asyncio.sleep(t0 + args.down_at - loop.time())
    stopping = loop.time()
    await asyncio.to_thread(server.stop, "fast")
    stopped = loop.time()
    await asyncio.sleep(max(0.0, t0 + args.up_at - loop.time()))
    starting = loop.time()
    await asyncio.to_thread(server.start)
    up = loop.time()
    outcomes = await load
    stats = await asyncio.to_thread(app.get_json, "/stats?lists=0")
    return {
        "t0": t0,
        "stopping": stopping,
        "stopped": stopped,
        "starting": starting,
        "up": up,
        "outcomes": outcomes,
        "stats": stats,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Stop and restart Postgres under load; return (and save) what the clients saw."""
    h.raise_fd_limit()
    if getattr(args, "recovery_only", False):
        return {"ready_probe": run_recovery(args)}
    results = run_outage(args)
    results["ready_probe"] = run_recovery(args)
    h.save("outage", results)
    return results


def run_outage(args: argparse.Namespace) -> dict[str, Any]:
    """The outage under load with the stale fallback (the first table)."""
    with h.postgres(need_control=True) as server:
        config = {
            "variant": "guardrails",
            "dsn": server.dsn("asyncpg"),
            "plain_dsn": server.dsn(),
            "pool_size": h.POOL_SIZE,
            "query_seconds": h.QUERY_SECONDS,
            "concurrency": h.POOL_SIZE,
            "queue_timeout": 1.0,
            "max_queue": 64,
            "stale": True,
            "probe": True,
            "fail_max": 5,
            "reset_timeout": RESET_TIMEOUT,
        }
        with h.serve(config, "outage") as app:
            app.get_json("/query")  # one good answer to fall back on
            app.get_json("/stats/reset")
            raw = asyncio.run(_scenario(app, server, args))
    return analyse(raw, args)


async def _recovery_once(app: h.Server, server: Any, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    warm, rate = 1.0, 20.0
    start = loop.time() + 0.2
    load = loop.create_task(
        h.open_loop(
            app.port,
            "/query",
            rate=rate,
            duration=warm + args.down_for + 3.0,
            timeout=5.0,
            start=start,
        )
    )
    await asyncio.sleep(start + warm - loop.time())
    stopping = loop.time()
    await asyncio.to_thread(server.stop, "fast")
    await asyncio.sleep(args.down_for)
    await asyncio.to_thread(server.start)
    up = loop.time()  # pg_ctl start has returned: the server accepts connections
    await load
    stats = await asyncio.to_thread(app.get_json, "/stats?lists=0")
    transitions = stats["transitions"]
    opened = next((t for t, _, new in transitions if new == "open" and t >= stopping), None)
    # The first closing after it opened: the probe may even win the race with pg_ctl's
    # own readiness check, which makes the figure negative.
    closed = next(
        (t for t, _, new in transitions if new == "closed" and opened is not None and t > opened),
        None,
    )
    return {
        "recovery": None if closed is None else closed - up,
        "opened": None if opened is None else opened - stopping,
        "trials_by_requests": sum(
            int(stats["handler_calls"].get(state, 0)) for state in ("open", "half_open")
        ),
        "transitions": len(transitions),
    }


def run_recovery(args: argparse.Namespace) -> dict[str, Any]:
    """Recovery with ``gr.ping(engine)``, ``reset_timeout=30`` and the default interval."""
    import guardrails as gr

    interval = gr.BreakerSettings().probe_interval
    runs = []
    with h.postgres(need_control=True) as server:
        config = {
            "variant": "guardrails",
            "dsn": server.dsn("asyncpg"),
            "pool_size": h.POOL_SIZE,
            "query_seconds": h.QUERY_SECONDS,
            "concurrency": h.POOL_SIZE,
            "probe": "ping",
            "fail_max": 5,
            "reset_timeout": RECOVERY_RESET_TIMEOUT,
        }
        for _ in range(args.runs):
            with h.serve(config, "recovery") as app:
                app.get_json("/query")
                app.get_json("/stats/reset")
                runs.append(asyncio.run(_recovery_once(app, server, args)))
    measured = [r["recovery"] for r in runs if r["recovery"] is not None]
    return {
        "reset_timeout": RECOVERY_RESET_TIMEOUT,
        "probe_interval": interval,
        "down_for": args.down_for,
        "target": RECOVERY_TARGET,
        "runs": runs,
        "worst": max(measured) if len(measured) == len(runs) else None,
    }


def recovery_markdown(results: dict[str, Any]) -> str:
    """The ready-probe recovery line(s), against the 2 s target."""
    runs = results["runs"]
    worst = results["worst"]
    each = ", ".join(_s(r["recovery"]) for r in runs)
    verdict = "met" if worst is not None and worst <= results["target"] else "MISSED"
    trials = sum(r["trials_by_requests"] for r in runs)
    return (
        f"Recovery with the ready probe (`probe=gr.ping(engine)`, `reset_timeout="
        f"{results['reset_timeout']:.0f}` s, default `probe_interval="
        f"{results['probe_interval']:g}` s; database down {results['down_for']:.0f} s under "
        f"20 requests/s): seconds from `pg_ctl start` returning to the breaker closed: "
        f"{each} (worst {_s(worst)}; target <= {results['target']:.0f} s: {verdict}). "
        f"Requests that reached the handler while the breaker was open or half-open "
        f"(user requests spent on a trial): {trials}."
    )


def analyse(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The outage figures from the timeline and the outcomes."""
    t0 = raw["t0"]
    transitions = raw["stats"]["transitions"]
    opened = next((t for t, _, new in transitions if new == "open" and t >= raw["stopping"]), None)
    closed = next((t for t, _, new in transitions if new == "closed" and t >= raw["up"]), None)
    outcomes: list[h.Outcome] = raw["outcomes"]
    if opened is not None:
        end = closed if closed is not None else math.inf
        while_open = [o for o in outcomes if opened <= t0 + o.due < end]
    else:
        while_open = []
    fallback = [o.latency for o in while_open if o.status in (200, 503)]
    first_fresh = min(
        (
            t0 + o.due + o.latency
            for o in outcomes
            if o.status == 200 and not o.stale and t0 + o.due + o.latency >= raw["up"]
        ),
        default=None,
    )
    during = [o for o in outcomes if raw["stopping"] <= t0 + o.due < (closed or math.inf)]
    stats = raw["stats"]

    def while_state(counts: dict[str, int]) -> int:
        return int(counts.get("open", 0))

    return {
        "rate": args.rate,
        "reset_timeout": RESET_TIMEOUT,
        "down_for": raw["up"] - raw["stopping"],
        "stop_took": raw["stopped"] - raw["stopping"],
        "start_took": raw["up"] - raw["starting"],
        "time_to_open": None if opened is None else opened - raw["stopping"],
        "open_for": None if opened is None or closed is None else closed - opened,
        "recovery": None if closed is None else closed - raw["up"],
        "first_fresh_2xx": None if first_fresh is None else first_fresh - raw["up"],
        "while_open": {
            "requests": len(while_open),
            "stale": sum(1 for o in while_open if o.status == 200 and o.stale),
            "rejected_503": sum(1 for o in while_open if o.status == 503),
            "other": sum(1 for o in while_open if o.status not in (200, 503)),
            "p50": h.percentile(fallback, 0.5),
            "p99": h.percentile(fallback, 0.99),
            "max": max(fallback, default=math.nan),
        },
        "errors_during_outage": sum(1 for o in during if o.status not in (200, 503)),
        "pool_while_open": {
            "handler_calls": while_state(stats["handler_calls"]),
            "checkouts": while_state(stats["checkouts"]),
            "connects": while_state(stats["connects"]),
        },
        "pool_while_half_open": {
            key: int(stats[key].get("half_open", 0))
            for key in ("handler_calls", "checkouts", "connects")
        },
        "transitions": [(round(t - t0, 3), old, new) for t, old, new in transitions],
        "timeline": {
            "stop": raw["stopping"] - t0,
            "up": raw["up"] - t0,
        },
        "limiter": stats.get("limiter"),
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def markdown(results: dict[str, Any]) -> str:
    """The outage section of docs/benchmarks.md."""
    if "while_open" not in results:
        return recovery_markdown(results["ready_probe"])
    w = results["while_open"]
    pool = results["pool_while_open"]
    rows = [
        ["requests sent while the breaker was open", w["requests"]],
        ["... answered with the stale response", w["stale"]],
        ["... answered 503", w["rejected_503"]],
        ["... anything else (500, no answer)", w["other"]],
        [
            "fallback p50 / p99 / max (ms)",
            f"{h.ms(w['p50'])} / {h.ms(w['p99'])} / {h.ms(w['max'])}",
        ],
        [
            "pool acquires while open (handler calls / checkouts / connects)",
            f"{pool['handler_calls']} / {pool['checkouts']} / {pool['connects']}",
        ],
        [
            "errors (500 or no answer) from the stop until the breaker closed",
            results["errors_during_outage"],
        ],
        ["time from `pg_ctl stop` to breaker open", _s(results["time_to_open"])],
        ["database down for", _s(results["down_for"])],
        ["recovery: database accepting connections -> breaker closed", _s(results["recovery"])],
        ["database accepting connections -> first fresh 2xx", _s(results["first_fresh_2xx"])],
    ]
    transitions = ", ".join(f"{t:.2f} s {old}->{new}" for t, old, new in results["transitions"])
    return "\n".join(
        [
            f"Open-loop load at {results['rate']:.0f} requests/s; breaker `fail_max=5`, "
            f"`reset_timeout={results['reset_timeout']:.0f}` s, probe `SELECT 1` on its own "
            f"connection; database stopped at {results['timeline']['stop']:.1f} s, "
            f"accepting connections again at {results['timeline']['up']:.1f} s.",
            "",
            h.table(["what", "value"], rows),
            "",
            f"Breaker transitions (seconds from the first arrival): {transitions}.",
            *(["", recovery_markdown(results["ready_probe"])] if "ready_probe" in results else []),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    return h.part_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    sys.exit(code)
