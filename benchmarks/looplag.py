"""Event-loop lag of the server while it sheds load at 10x the pool's capacity.

Inside the server a task sleeps 10 ms in a loop and records how late it wakes up: the
delay every other callback on that loop suffers too. Measured idle, then under
open-loop load at 10x capacity, for guardrails and for the hand-written semaphore.

    .venv/bin/python benchmarks/looplag.py [--rate 1000] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from typing import Any

import _harness as h

VARIANTS = {
    "guardrails": "GuardrailsMiddleware (5 slots, queue 64)",
    "semaphore": "BaseHTTPMiddleware + asyncio.Semaphore(5), 1 s wait",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=10 * h.CAPACITY, help="requests per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of arrivals")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of idle measurement")


def _lag(samples: list[float]) -> dict[str, float]:
    return {
        "samples": len(samples),
        "p50": h.percentile(samples, 0.5),
        "p99": h.percentile(samples, 0.99),
        "max": max(samples, default=math.nan),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Idle and loaded loop lag for each variant; returns (and saves) the results."""
    h.raise_fd_limit()
    results: dict[str, Any] = {"rate": args.rate, "duration": args.duration, "runs": {}}
    with h.postgres() as server:
        for variant in VARIANTS:
            config = {
                "variant": variant,
                "dsn": server.dsn("asyncpg"),
                "pool_size": h.POOL_SIZE,
                "query_seconds": h.QUERY_SECONDS,
                "concurrency": h.POOL_SIZE,
                "queue_timeout": 1.0,
                "max_queue": 64,
            }
            with h.serve(config, f"looplag-{variant}") as app:
                app.get_json("/stats/reset")
                time.sleep(args.idle)
                idle = app.get_json("/stats")["lag"]
                app.get_json("/stats/reset")
                outcomes = asyncio.run(
                    h.open_loop(
                        app.port, "/query", rate=args.rate, duration=args.duration, timeout=5.0
                    )
                )
                loaded = app.get_json("/stats")["lag"]
            figures = h.summary(outcomes, args.duration)
            results["runs"][variant] = {"idle": _lag(idle), "load": _lag(loaded), **figures}
            print(f"  {variant}: {figures['shed']} shed", file=sys.stderr)
    h.save("looplag", results)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The event-loop lag section of docs/benchmarks.md."""
    rows = []
    for variant, label in VARIANTS.items():
        r = results["runs"][variant]
        idle, load = r["idle"], r["load"]
        rows.append(
            [
                label,
                f"{h.ms(idle['p50'])} / {h.ms(idle['p99'])} / {h.ms(idle['max'])}",
                f"{h.ms(load['p50'])} / {h.ms(load['p99'])} / {h.ms(load['max'])}",
                f"{r['ok']} / {r['shed']} / {r['other']}",
                f"{h.ms(r['shed_p50'])} / {h.ms(r['shed_p99'])}",
                h.ms(r["lag_p99"]),
            ]
        )
    headers = [
        "server",
        "loop lag idle p50 / p99 / max ms",
        "loop lag shedding p50 / p99 / max ms",
        "2xx / 503 / other",
        "503 p50 / p99 ms",
        "client lag p99 ms",
    ]
    return "\n".join(
        [
            f"Open-loop load at {results['rate']:.0f} requests/s (10x capacity) for "
            f"{results['duration']:.0f} s; lag = how late a 10 ms sleep in the server wakes up.",
            "",
            h.table(headers, rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    return h.part_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
