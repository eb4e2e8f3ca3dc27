"""Overload: real uvicorn, real PostgreSQL, pool 5, a 50 ms query, open-loop load at 4x capacity.

Three servers side by side under the same load: no guardrails (SQLAlchemy's pool queue
with its default 30 s timeout), a hand-written ``BaseHTTPMiddleware`` semaphore with a
1 s wait timeout, and ``GuardrailsMiddleware``. First the client is checked against a
trivial endpoint at the same rate, to show it is not itself the bottleneck.

    .venv/bin/python benchmarks/overload.py [--rate 400] [--duration 8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import _harness as h

VARIANTS = {
    "bare": "no guardrails (SQLAlchemy pool, pool_timeout 30 s)",
    "semaphore": "BaseHTTPMiddleware + asyncio.Semaphore(5), 1 s wait",
    "guardrails": "GuardrailsMiddleware (6 slots, queue 64, queue_timeout 1 s)",
}
DEADLINE = 2.0
"""The guarded route's ``Policy(timeout=...)``: no answer may come later than this."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=4 * h.CAPACITY, help="requests per second")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per run")
    parser.add_argument(
        "--timeout", type=float, default=8.0, help="seconds the client waits for any answer"
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=h.POOL_SIZE + 1,
        help="guardrails' concurrency (default: one above the pool size, so a request is "
        "always waiting at the pool when a connection comes back)",
    )
    parser.add_argument(
        "--only", choices=list(VARIANTS), action="append", help="run only these servers"
    )


def server_config(variant: str, server: Any, slots: int = h.POOL_SIZE + 1) -> dict[str, Any]:
    return {
        "variant": variant,
        "dsn": server.dsn("asyncpg"),
        "pool_size": h.POOL_SIZE,
        "query_seconds": h.QUERY_SECONDS,
        "concurrency": slots if variant == "guardrails" else h.POOL_SIZE,
        "queue_timeout": 1.0,
        "max_queue": 64,
        "deadline": DEADLINE,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the client check and the three servers; return (and save) the results."""
    h.raise_fd_limit()
    results: dict[str, Any] = {
        "rate": args.rate,
        "duration": args.duration,
        "capacity": h.CAPACITY,
        "slots": args.slots,
        "runs": {},
    }
    with h.postgres() as server:
        results["postgres"] = h.postgres_version(server)
        with h.serve(server_config("bare", server), "overload-client-check") as app:
            outcomes = asyncio.run(
                h.open_loop(
                    app.port, "/trivial", rate=args.rate, duration=args.duration, timeout=2.0
                )
            )
            results["client_check"] = h.summary(outcomes, args.duration)
        for variant in args.only or VARIANTS:
            config = server_config(variant, server, args.slots)
            with h.serve(config, f"overload-{variant}") as app:
                app.get_json("/stats/reset")
                outcomes = asyncio.run(
                    h.open_loop(
                        app.port,
                        "/query",
                        rate=args.rate,
                        duration=args.duration,
                        timeout=args.timeout,
                    )
                )
                stats = app.get_json("/stats")
            figures = h.summary(outcomes, args.duration)
            figures["past_deadline"] = sum(1 for o in outcomes if o.latency > DEADLINE)
            figures["limiter"] = stats.get("limiter")
            holds = stats["holds"]
            figures["pool_hold_mean"] = sum(holds) / len(holds) if holds else float("nan")
            results["runs"][variant] = figures
            print(f"  {variant}: {figures['ok']} ok, {figures['shed']} shed", file=sys.stderr)
    h.save("overload", results)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The overload section of docs/benchmarks.md."""
    check = results["client_check"]
    rows = []
    for variant, r in results["runs"].items():
        label = VARIANTS[variant]
        if variant == "guardrails":
            slots = results.get("slots", h.POOL_SIZE)
            label = label.replace("6 slots", f"{slots} slots")
        rows.append(
            [
                label,
                r["sent"],
                f"{r['goodput']:.1f}/s ({r['goodput_fraction']:.0%})",
                h.ms(r["ok_p50"]),
                h.ms(r["ok_p99"]),
                r["shed"],
                h.ms(r["shed_p50"]),
                h.ms(r["shed_p99"]),
                r["other"],
                r["past_5s"],
                h.ms(r["lag_p99"]),
                f"{r['pool_hold_mean'] * 1000:.1f}",
            ]
        )
    headers = [
        "server",
        "sent",
        "goodput (2xx <= 1 s)",
        "2xx p50 ms",
        "2xx p99 ms",
        "503",
        "503 p50 ms",
        "503 p99 ms",
        "other / no answer",
        "past 5 s",
        "client lag p99 ms",
        "pool hold mean ms",
    ]
    guarded = results["runs"].get("guardrails")
    if guarded is None:
        return h.table(headers, rows)
    return "\n".join(
        [
            f"Offered {results['rate']:.0f} requests/s for {results['duration']:.0f} s "
            f"(capacity {results['capacity']:.0f}/s: pool 5 / 50 ms), {results['postgres']}.",
            "",
            h.table(headers, rows),
            "",
            f"Client check (`/trivial`, no database, same rate): p50 {h.ms(check['ok_p50'])} "
            f"ms, p99 {h.ms(check['ok_p99'])} ms, {check['other']} failed; client lag p99 "
            f"{h.ms(check['lag_p99'])} ms, max {h.ms(check['lag_max'])} ms.",
            "",
            f"Guardrails: {guarded['past_deadline']} answers later than the route's "
            f"{DEADLINE:.0f} s deadline (slowest {h.ms(guarded['max'])} ms); limiter after "
            f"the run: `{guarded['limiter']}`.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(markdown(run(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
