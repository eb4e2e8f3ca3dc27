"""Overload: real uvicorn, real PostgreSQL, pool 5, a 50 ms query: sustained 4x, then a burst.

Five servers side by side under the same load: no guardrails (SQLAlchemy's pool queue
with its default 30 s timeout), a hand-written ``BaseHTTPMiddleware`` semaphore with a
1 s and with a 250 ms wait, uvicorn's own ``--limit-concurrency 6``, and
``GuardrailsMiddleware`` with the library's defaults and concurrency equal to the pool
size. Each server gets, in turn:

1. sustained overload: open-loop arrivals at 4x capacity for ``--duration`` seconds;
2. once it is idle again, a calm second at 0.5x capacity, then a 1 s burst at 1.5x.

Then priorities, on guardrails alone: ``critical`` logins with no other load, and again
while ``normal`` traffic at 3x capacity and ``low`` reports at 1x overload the server.
First the client is checked against a trivial endpoint at the same rate, to show it is
not itself the bottleneck.

    .venv/bin/python benchmarks/overload.py [--rate 400] [--duration 8] [--only guardrails]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import _harness as h
import overload_chart

VARIANTS = {
    "bare": "no guardrails (SQLAlchemy pool, pool_timeout 30 s)",
    "semaphore": "BaseHTTPMiddleware + asyncio.Semaphore(5), 1 s wait",
    "semaphore-250ms": "BaseHTTPMiddleware + asyncio.Semaphore(5), 250 ms wait",
    "uvicorn": "uvicorn --limit-concurrency 6",
    "guardrails": "GuardrailsMiddleware, defaults, concurrency 5",
}
DEADLINE = 2.0
"""The guarded route's ``Policy(timeout=...)``: no answer may come later than this."""
QUEUE_TIMEOUT = 1.0
"""guardrails' default ``queue_timeout``, which the 2xx latency bound is stated in."""
STEADY_AFTER = 3.0
"""Requests due this many seconds into the sustained run count as steady state."""
CALM, BURST = 0.5, 1.5
"""The calm second's and the burst's rates, as multiples of capacity."""
LOGIN_RATE = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=4 * h.CAPACITY, help="requests per second")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per run")
    parser.add_argument(
        "--timeout", type=float, default=8.0, help="seconds the client waits for any answer"
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=h.POOL_SIZE,
        help="guardrails' concurrency (default: the pool size)",
    )
    parser.add_argument(
        "--only", choices=list(VARIANTS), action="append", help="run only these servers"
    )
    parser.add_argument(
        "--no-priorities", action="store_true", help="skip the login / reports scenario"
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="every server calls gc.freeze() after startup (docs/operations.md)",
    )


def server_config(
    variant: str, server: Any, slots: int = h.POOL_SIZE, *, gc_freeze: bool = False
) -> dict[str, Any]:
    """The app's config for one variant; guardrails gets nothing but its concurrency."""
    config: dict[str, Any] = {
        "variant": "semaphore" if variant.startswith("semaphore") else variant,
        "dsn": server.dsn("asyncpg"),
        "pool_size": h.POOL_SIZE,
        "query_seconds": h.QUERY_SECONDS,
        "concurrency": slots if variant == "guardrails" else h.POOL_SIZE,
        "deadline": DEADLINE,
    }
    if variant == "semaphore":
        config["queue_timeout"] = 1.0
    elif variant == "semaphore-250ms":
        config["queue_timeout"] = 0.25
    elif variant == "uvicorn":
        config["limit_concurrency"] = h.POOL_SIZE + 1
    if gc_freeze:
        config["gc"] = "freeze"
    return config


def _wait_idle(app: h.Server, limit: float = 60.0) -> float:
    """Wait until no request is in a handler (or the limiter); return the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        stats = app.get_json("/stats?lists=0")
        limiter = stats.get("limiter") or {}
        if not stats["active"] and not limiter.get("in_flight") and not limiter.get("queued"):
            break
        time.sleep(0.1)
    return time.monotonic() - started


def _ok(outcomes: Sequence[h.Outcome]) -> list[float]:
    return [o.latency for o in outcomes if o.status is not None and 200 <= o.status < 300]


def _sustained(app: h.Server, args: argparse.Namespace) -> tuple[dict[str, Any], list[h.Outcome]]:
    app.get_json("/stats/reset")
    outcomes = asyncio.run(
        h.open_loop(
            app.port, "/query", rate=args.rate, duration=args.duration, timeout=args.timeout
        )
    )
    stats = app.get_json("/stats")
    figures: dict[str, Any] = dict(h.summary(outcomes, args.duration))
    holds = stats["holds"]
    hold = sum(holds) / len(holds) if holds else math.nan
    figures["pool_hold_mean"] = hold
    # The pool serves at most pool_size / hold requests a second.
    figures["goodput_of_hold"] = figures["goodput"] / (h.POOL_SIZE / hold)
    steady = [o for o in outcomes if o.due >= STEADY_AFTER]
    figures["steady_ok_p99"] = h.percentile(_ok(steady), 0.99)
    figures["ok_max"] = max(_ok(outcomes), default=math.nan)
    figures["past_deadline"] = sum(1 for o in outcomes if o.latency > DEADLINE)
    figures["limiter"] = stats.get("limiter")
    # The server's own event-loop lag: a stall of the shared machine shows here, in
    # whichever server it hit.
    figures["server_lag_p99"] = h.percentile(stats["lag"], 0.99)
    return figures, outcomes


async def _calm_then_burst(port: int, timeout: float) -> tuple[list[h.Outcome], list[h.Outcome]]:
    start = asyncio.get_running_loop().time() + 0.05
    calm, burst = await asyncio.gather(
        h.open_loop(
            port, "/query", rate=CALM * h.CAPACITY, duration=1.0, timeout=timeout, start=start
        ),
        h.open_loop(
            port,
            "/query",
            rate=BURST * h.CAPACITY,
            duration=1.0,
            timeout=timeout,
            start=start + 1.0,
        ),
    )
    return calm, burst


def _burst(app: h.Server, args: argparse.Namespace) -> tuple[dict[str, Any], list[h.Outcome]]:
    waited = _wait_idle(app)
    calm, burst = asyncio.run(_calm_then_burst(app.port, args.timeout))
    ok = _ok(burst)
    figures = {
        "idle_wait": waited,
        "calm_sent": len(calm),
        "calm_shed": sum(1 for o in calm if o.status == 503),
        "sent": len(burst),
        "shed": sum(1 for o in burst if o.status == 503),
        "other": sum(1 for o in burst if o.status not in (200, 503)),
        "ok_p99": h.percentile(ok, 0.99),
        "ok_max": max(ok, default=math.nan),
        "limiter": app.get_json("/stats?lists=0").get("limiter"),
    }
    return figures, [*calm, *(o for o in _shifted(burst, 1.0))]


def _shifted(outcomes: Sequence[h.Outcome], seconds: float) -> list[h.Outcome]:
    return [h.Outcome(o.due + seconds, o.status, o.latency, o.lag) for o in outcomes]


def _lane(outcomes: Sequence[h.Outcome]) -> dict[str, Any]:
    ok = _ok(outcomes)
    return {
        "sent": len(outcomes),
        "ok": len(ok),
        "shed": sum(1 for o in outcomes if o.status == 503),
        "other": sum(1 for o in outcomes if o.status not in (200, 503)),
        "ok_p50": h.percentile(ok, 0.5),
        "ok_p99": h.percentile(ok, 0.99),
        "ok_max": max(ok, default=math.nan),
    }


async def _mixed(port: int, duration: float, timeout: float) -> dict[str, list[h.Outcome]]:
    start = asyncio.get_running_loop().time() + 0.05
    lanes = {"/query": 3 * h.CAPACITY, "/reports": h.CAPACITY, "/login": LOGIN_RATE}
    results = await asyncio.gather(
        *(
            h.open_loop(port, path, rate=rate, duration=duration, timeout=timeout, start=start)
            for path, rate in lanes.items()
        )
    )
    return dict(zip(lanes, results, strict=True))


def _priorities(server: Any, args: argparse.Namespace) -> dict[str, Any]:
    config = server_config("guardrails", server, args.slots, gc_freeze=args.gc_freeze)
    with h.serve(config, "overload-priorities") as app:
        alone = asyncio.run(
            h.open_loop(app.port, "/login", rate=LOGIN_RATE, duration=3.0, timeout=args.timeout)
        )
        _wait_idle(app)
        mixed = asyncio.run(_mixed(app.port, args.duration, args.timeout))
        limiter = app.get_json("/stats?lists=0").get("limiter")
    return {
        "login_alone": _lane(alone),
        "login": _lane(mixed["/login"]),
        "query": _lane(mixed["/query"]),
        "reports": _lane(mixed["/reports"]),
        "limiter": limiter,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the client check, the servers and the priorities; return (and save) the results."""
    h.raise_fd_limit()
    results: dict[str, Any] = {
        "rate": args.rate,
        "duration": args.duration,
        "capacity": h.CAPACITY,
        "slots": args.slots,
        "gc_freeze": args.gc_freeze,
        "runs": {},
        "bursts": {},
        "timelines": {},
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
            config = server_config(variant, server, args.slots, gc_freeze=args.gc_freeze)
            with h.serve(config, f"overload-{variant}") as app:
                figures, sustained = _sustained(app, args)
                burst, calm_burst = _burst(app, args)
            results["runs"][variant] = figures
            results["bursts"][variant] = burst
            if variant in overload_chart.CHARTED:
                results["timelines"][variant] = {
                    "sustained": overload_chart.timeline(sustained),
                    "burst": overload_chart.timeline(calm_burst),
                }
            print(
                f"  {variant}: {figures['ok']} ok, {figures['shed']} shed; "
                f"burst {burst['shed']}/{burst['sent']} shed",
                file=sys.stderr,
            )
        if not args.no_priorities:
            results["priorities"] = _priorities(server, args)
    h.save("overload", results)
    overload_chart.plot(results)
    return results


def _verdicts(r: dict[str, Any], burst: dict[str, Any]) -> list[tuple[str, str, bool]]:
    hold = r["pool_hold_mean"]
    return [
        ("goodput", ">= 95% of 5 / hold", r["goodput_of_hold"] >= 0.95),
        (
            "steady 2xx p99",
            f"<= 2 x hold = {2 * hold * 1000:.0f} ms",
            r["steady_ok_p99"] <= 2 * hold,
        ),
        (
            "2xx max",
            f"<= queue_timeout + 2 x hold = {(QUEUE_TIMEOUT + 2 * hold) * 1000:.0f} ms",
            r["ok_max"] <= QUEUE_TIMEOUT + 2 * hold,
        ),
        ("503 p99", "<= 10 ms", not r["shed_p99"] > 0.010),
        ("burst 503", "0", burst["shed"] == 0),
        ("past the deadline", f"0 after {DEADLINE:.0f} s", r["past_deadline"] == 0),
    ]


def priority_verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """Work-conserving priorities against their targets: (name, bar, value, met)."""
    prio = results.get("priorities")
    guarded = results["runs"].get("guardrails")
    if prio is None or guarded is None:
        return []
    alone, loaded, reports = prio["login_alone"], prio["login"], prio["reports"]
    query = h.QUERY_SECONDS
    rows = [
        (
            "goodput, concurrency == pool size",
            ">= 95% of 5 / hold",
            f"{guarded['goodput_of_hold']:.1%}",
            guarded["goodput_of_hold"] >= 0.95,
        )
    ]
    for name, key in (("p50", "ok_p50"), ("p99", "ok_p99")):
        bar = alone[key] + query
        rows.append(
            (
                f"login {name} under load",
                f"<= no load + one query = {bar * 1000:.0f} ms",
                f"{h.ms(loaded[key])} ms ({loaded['shed']} of {loaded['sent']} shed)",
                loaded[key] <= bar and loaded["shed"] == 0,
            )
        )
    rows.append(
        (
            "reports shed while logins are served",
            "> 0",
            f"{reports['shed']} of {reports['sent']}",
            reports["shed"] > 0,
        )
    )
    return rows


def markdown(results: dict[str, Any]) -> str:
    """The overload section of docs/benchmarks.md."""
    check = results["client_check"]
    bursts = results.get("bursts", {})
    rows = []
    for variant, r in results["runs"].items():
        burst = bursts.get(variant, {})
        rows.append(
            [
                VARIANTS.get(variant, variant),
                f"{r['goodput']:.1f}/s ({r['goodput_of_hold']:.0%})",
                h.ms(r["ok_p50"]),
                h.ms(r["ok_p99"]),
                h.ms(r["steady_ok_p99"]),
                h.ms(r["ok_max"]),
                r["shed"],
                h.ms(r["shed_p99"]),
                r["other"],
                f"{burst.get('shed', '-')} of {burst.get('sent', '-')}",
                h.ms(burst.get("ok_p99", math.nan)),
                f"{r['pool_hold_mean'] * 1000:.1f}",
                h.ms(r.get("server_lag_p99", math.nan)),
            ]
        )
    headers = [
        "server",
        "goodput, 2xx <= 1 s (of 5 / hold)",
        "2xx p50 ms",
        "2xx p99 ms",
        f"2xx p99 after {STEADY_AFTER:.0f} s ms",
        "2xx max ms",
        "503",
        "503 p99 ms",
        "other / no answer",
        "burst 503",
        "burst 2xx p99 ms",
        "pool hold ms",
        "server loop lag p99 ms",
    ]
    parts = [
        f"Sustained: {results['rate']:.0f} requests/s for {results['duration']:.0f} s "
        f"(capacity {results['capacity']:.0f}/s: pool 5 / 50 ms), {results['postgres']}. "
        f"Burst: once idle, {CALM * h.CAPACITY:.0f}/s for 1 s, then "
        f"{BURST * h.CAPACITY:.0f}/s for 1 s."
        + (
            " Every server calls `gc.freeze()` after startup (docs/operations.md)."
            if results.get("gc_freeze")
            else ""
        ),
        "",
        h.table(headers, rows),
        "",
        f"Client check (`/trivial`, no database, same rate): p50 {h.ms(check['ok_p50'])} "
        f"ms, p99 {h.ms(check['ok_p99'])} ms, {check['other']} failed; client lag p99 "
        f"{h.ms(check['lag_p99'])} ms, max {h.ms(check['lag_max'])} ms.",
    ]
    if results.get("timelines"):
        parts += ["", overload_chart.markdown(overload_chart.OUTPUT)]
    guarded = results["runs"].get("guardrails")
    if guarded is not None:
        verdicts = _verdicts(guarded, bursts.get("guardrails", {"shed": math.nan}))
        parts += [
            "",
            h.table(
                ["guardrails target", "bar", ""],
                [[name, bar, "met" if ok else "**missed**"] for name, bar, ok in verdicts],
            ),
            "",
            f"Guardrails' limiter after the sustained run: `{guarded['limiter']}`; "
            f"after the burst: `{bursts.get('guardrails', {}).get('limiter')}`.",
        ]
    prio = results.get("priorities")
    if prio is not None:
        lanes = [
            ("login (critical), no other load", prio["login_alone"]),
            ("login (critical), under load", prio["login"]),
            ("normal, 3x capacity", prio["query"]),
            ("reports (low), 1x capacity", prio["reports"]),
        ]
        parts += [
            "",
            f"Priorities (guardrails, defaults): logins at {LOGIN_RATE:.0f}/s alone for 3 s, "
            f"then with normal traffic and reports for {results['duration']:.0f} s.",
            "",
            h.table(
                ["lane", "sent", "2xx", "503", "2xx p50 ms", "2xx p99 ms", "2xx max ms"],
                [
                    [
                        name,
                        r["sent"],
                        r["ok"],
                        r["shed"],
                        h.ms(r["ok_p50"]),
                        h.ms(r["ok_p99"]),
                        h.ms(r["ok_max"]),
                    ]
                    for name, r in lanes
                ],
            ),
            "",
            h.table(
                ["priorities target", "bar", "this run", ""],
                [
                    [name, bar, value, "met" if ok else "**missed**"]
                    for name, bar, value, ok in priority_verdicts(results)
                ],
            ),
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    return h.part_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
