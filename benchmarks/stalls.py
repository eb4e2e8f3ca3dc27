"""Which process stalls under overload: the server, or the benchmark's own client?

Runs the overload benchmark's sustained 4x load against one server (guardrails by
default), records garbage-collection pauses and event-loop lag with timestamps in both
the server (``app.py`` with ``stall_log``) and this process, and lines them up with the
requests that were slow: steady-state 2xx over 2 x hold, 503s over 10 ms.

    .venv/bin/python benchmarks/stalls.py [--variant guardrails] [--client-gc default|freeze|off]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import sys
from typing import Any

import _harness as h
import overload
from _stalls import StallLog


def _overlap(start: float, end: float, events: list[tuple[float, float]], least: float) -> float:
    """Seconds of stalls of at least ``least`` that overlap ``[start, end]``."""
    total = 0.0
    for at, seconds in events:
        if seconds >= least and at < end and at + seconds > start:
            total += min(end, at + seconds) - max(start, at)
    return total


async def _traced(
    port: int, rate: float, duration: float, start: float
) -> tuple[list[h.Outcome], dict[int, tuple[float, float, float]]]:
    """``h.open_loop`` with an id per request and the client's own times for each step."""
    loop = asyncio.get_running_loop()
    outcomes: list[h.Outcome] = []
    trace: dict[int, tuple[float, float, float]] = {}

    async def one(i: int, due: float, at: float) -> None:
        lag = loop.time() - at
        status = None
        writer = None
        connected = head_at = math.nan
        try:
            reader, writer = await asyncio.open_connection(h.HOST, port)
            connected = loop.time()
            writer.write(
                f"GET /query?i={i} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            head_at = loop.time()
            await reader.read()
            status = int(head[9:12])
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if writer is not None:
                writer.close()
        done = loop.time()
        outcomes.append(h.Outcome(due, status, done - at, lag))
        trace[i] = (at, connected, head_at)

    tasks = set()
    for i in range(int(rate * duration)):
        due = i / rate
        at = start + due
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(i, due, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    outcomes.sort(key=lambda o: o.due)
    return outcomes, trace


async def _load(
    port: int, args: argparse.Namespace, log: StallLog
) -> tuple[float, list[h.Outcome], dict[int, tuple[float, float, float]]]:
    loop = asyncio.get_running_loop()
    watcher = loop.create_task(log.watch_lag())
    start = loop.time() + 0.05
    try:
        outcomes, trace = await _traced(port, args.rate, args.duration, start)
    finally:
        watcher.cancel()
    return start, outcomes, trace


def run(args: argparse.Namespace) -> dict[str, Any]:
    h.raise_fd_limit()
    log = StallLog().install()
    with h.postgres() as server:
        config = overload.server_config(args.variant, server)
        config["stall_log"] = True
        if args.server_gc:
            config["gc"] = args.server_gc
        with h.serve(config, f"stalls-{args.variant}") as app:
            app.get_json("/stats/reset")
            log.clear()
            if args.client_gc == "freeze":
                gc.collect()
                gc.freeze()
            elif args.client_gc == "off":
                gc.collect()
                gc.disable()
            try:
                start, outcomes, trace = asyncio.run(_load(app.port, args, log))
            finally:
                gc.enable()
                gc.unfreeze()
            stats = app.get_json("/stats")
            remote = app.get_json(f"/stalls?since={start - 1}")
    holds = stats["holds"]
    hold = sum(holds) / len(holds)
    mine = log.to_dict(start - 1)
    client_gc = [(g[0], g[1]) for g in mine["gc"]]
    server_gc = [(g[0], g[1]) for g in remote["gc"]]
    sources = {
        "client gc": client_gc,
        "client lag": [tuple(x) for x in mine["lag"]],
        "server gc": server_gc,
        "server lag": [tuple(x) for x in remote["lag"]],
    }
    slow_ok = [
        o
        for o in outcomes
        if o.status == 200 and o.due >= overload.STEADY_AFTER and o.latency > 2 * hold
    ]
    steady_ok = [o for o in outcomes if o.status == 200 and o.due >= overload.STEADY_AFTER]
    shed = [o for o in outcomes if o.status == 503]
    slow_shed = [o for o in shed if o.latency > 0.010]
    fast_shed = [o for o in shed if o.latency <= 0.010]

    def blame(group: list[h.Outcome], least: float = 0.005) -> dict[str, float]:
        out = {}
        for name, events in sources.items():
            hit = sum(
                1
                for o in group
                if _overlap(start + o.due, start + o.due + o.latency, events, least) > 0
            )
            out[name] = hit / len(group) if group else math.nan
        return out

    def pauses(events: list[list[float]]) -> dict[str, Any]:
        by_gen: dict[int, list[tuple[float, float]]] = {}
        for at, seconds, gen, _, cpu in events:
            if start <= at <= start + args.duration + 1:
                by_gen.setdefault(int(gen), []).append((seconds, cpu))
        return {
            f"gen{gen}": {
                "count": len(v),
                "wall_total_ms": round(sum(w for w, _ in v) * 1000, 1),
                "wall_max_ms": round(max(w for w, _ in v) * 1000, 1),
                "cpu_total_ms": round(sum(c for _, c in v) * 1000, 1),
                "cpu_max_ms": round(max(c for _, c in v) * 1000, 1),
            }
            for gen, v in sorted(by_gen.items())
        }

    served = {i: (entered, left) for i, entered, left in remote["requests"]}
    rate = args.rate

    def parts(group: list[h.Outcome]) -> dict[str, float]:
        """Median/p99/max split of latency: before the app, in the app, after the app."""
        before, inside, after = [], [], []
        for o in group:
            i = round(o.due * rate)
            if i not in served:
                continue
            at = trace[i][0]
            entered, left = served[i]
            before.append(entered - at)
            inside.append(left - entered)
            after.append(at + o.latency - left)

        def q(v: list[float]) -> str:
            return (
                "/".join(f"{h.percentile(v, p) * 1000:.1f}" for p in (0.5, 0.99))
                + f"/{max(v, default=math.nan) * 1000:.1f}"
            )

        return {
            "n": len(before),
            "before_app p50/p99/max": q(before),
            "in_app": q(inside),
            "after_app": q(after),
        }

    result = {
        "variant": args.variant,
        "client_gc_mode": args.client_gc,
        "server_gc_mode": args.server_gc,
        "hold_ms": hold * 1000,
        "summary": h.summary(outcomes, args.duration),
        "steady_ok_p99_ms": h.percentile([o.latency for o in steady_ok], 0.99) * 1000,
        "shed_p99_ms": h.percentile([o.latency for o in shed], 0.99) * 1000,
        "slow_steady_ok": len(slow_ok),
        "steady_ok": len(steady_ok),
        "slow_shed": len(slow_shed),
        "shed": len(shed),
        "server_heap": [remote["heap"], remote["frozen"]],
        "server_promoted": remote["promoted"][:25],
        "client_gc": pauses(mine["gc"]),
        "server_gc": pauses(remote["gc"]),
        "client_lag_over_20ms": sorted(
            (round(s * 1000, 1) for _, s in mine["lag"] if s > 0.02), reverse=True
        )[:15],
        "server_lag_over_20ms": sorted(
            (round(s * 1000, 1) for _, s in remote["lag"] if s > 0.02), reverse=True
        )[:15],
        "split_slow_steady_ok": parts(slow_ok),
        "split_all_steady_ok": parts(steady_ok),
        "split_slow_shed": parts(slow_shed),
        "split_all_shed": parts(shed),
        "blame_slow_steady_ok": blame(slow_ok),
        "blame_all_steady_ok": blame(steady_ok),
        "blame_slow_shed": blame(slow_shed),
        "blame_fast_shed": blame(fast_shed),
    }
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump(
                {
                    "start": start,
                    "outcomes": [[o.due, o.status, o.latency, o.lag] for o in outcomes],
                    "trace": trace,
                    "client": mine,
                    "server": remote,
                },
                f,
            )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=list(overload.VARIANTS), default="guardrails")
    parser.add_argument("--rate", type=float, default=4 * h.CAPACITY)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--client-gc", choices=["default", "freeze", "off"], default="default")
    parser.add_argument("--server-gc", choices=["", "freeze"], default="")
    parser.add_argument("--dump", help="write outcomes and stall logs as JSON here")
    print(json.dumps(run(parser.parse_args(argv)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
