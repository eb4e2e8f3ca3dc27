"""Run the whole benchmark suite and write docs/benchmarks.md from what it measured.

Parts, each also runnable alone (``--help`` on each): ``overhead.py`` (in-process
ASGI), ``overload.py`` (4x capacity on real uvicorn and PostgreSQL), ``outage.py``
(PostgreSQL stopped under load), ``looplag.py`` (event-loop lag at 10x capacity) and
``adaptive.py`` (fixed against adaptive limit on CPU-bound queries).

    make bench     # or: .venv/bin/python benchmarks/run.py [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import _harness as h
import adaptive
import looplag
import outage
import overhead
import overload

PARTS = {
    "overhead": overhead,
    "overload": overload,
    "outage": outage,
    "looplag": looplag,
    "adaptive": adaptive,
}

INTRO = """\
# Benchmarks

Benchmarks are not part of the test run: timings on shared machines are noisy, so
every number below is compared with a baseline measured in the same run, and the
in-process numbers are medians of interleaved rounds. This page is written by the
suite itself from one run:

```
make bench        # or: .venv/bin/python benchmarks/run.py
```

Each part also runs alone and prints its table: `benchmarks/overhead.py`,
`benchmarks/overload.py`, `benchmarks/outage.py`, `benchmarks/looplag.py`,
`benchmarks/adaptive.py` (`--help` for their options). The load parts start a
throwaway PostgreSQL cluster (or use `DATABASE_URL`), run the app under uvicorn in a
child process on 127.0.0.1, and send real HTTP from an open-loop client in the
benchmark process: each request leaves at its scheduled time whether or not earlier
ones have answered, and its latency counts from that scheduled time, so a stalled
server cannot slow the load down and hide it.
"""


def _machine(info: dict[str, str], postgres: str) -> str:
    rows = [
        ["CPU", f"{info['cpu']} ({info['cores']} cores)"],
        ["OS", info["os"]],
        ["Python", info["python"]],
        ["guardrails", info["guardrails"]],
        ["libraries", info["libraries"]],
        ["database", postgres],
    ]
    return h.table(["", ""], rows)


def _check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def targets(results: dict[str, Any]) -> str:
    """DESIGN.md's targets against this run's numbers."""
    rows = []
    over = results.get("overhead")
    if over:
        ratio = over["cases"]["admitted"]["ratio"]
        rows.append(["hot path, admitted", "<= 1.25x bare", f"{ratio:.3f}x", _check(ratio <= 1.25)])
    load = results.get("overload")
    if load and "guardrails" in load["runs"]:
        g = load["runs"]["guardrails"]
        burst = load.get("bursts", {}).get("guardrails", {"shed": math.nan})
        rows += [
            [f"overload {name}", bar, value, _check(ok)]
            for (name, bar, ok), value in zip(
                overload._verdicts(g, burst),
                [
                    f"{g['goodput_of_hold']:.1%} (pool / query time: {g['goodput_fraction']:.0%})",
                    f"{h.ms(g['steady_ok_p99'])} ms",
                    f"{h.ms(g['ok_max'])} ms",
                    f"{h.ms(g['shed_p99'])} ms",
                    f"{burst['shed']} of {burst.get('sent', '-')}",
                    str(g["past_deadline"]),
                ],
                strict=True,
            )
        ]
        rows += _priority_targets(load)
    out = results.get("outage")
    if out:
        w = out["while_open"]
        pool = out["pool_while_open"]
        acquires = pool["checkouts"] + pool["connects"]
        recovery = out["recovery"]
        rows += [
            [
                "fallback p99, breaker open",
                "<= 5 ms",
                f"{h.ms(w['p99'])} ms",
                _check(w["p99"] <= 0.005),
            ],
            [
                "pool acquires while open",
                "0",
                f"{acquires} checkouts/connects, {pool['handler_calls']} attempts",
                _check(acquires == 0 and pool["handler_calls"] == 0),
            ],
            [
                "recovery after the database returns",
                f"<= reset_timeout + 1 s = {out['reset_timeout'] + 1:.0f} s",
                "-" if recovery is None else f"{recovery:.2f} s",
                _check(None if recovery is None else recovery <= out["reset_timeout"] + 1),
            ],
        ]
        ready = out.get("ready_probe")
        if ready:
            worst = ready["worst"]
            rows.append(
                [
                    "recovery with a probe (`gr.ping`, reset_timeout 30 s, default interval)",
                    f"<= {ready['target']:.0f} s after the database accepts connections",
                    "-" if worst is None else f"worst of {len(ready['runs'])}: {worst:.2f} s",
                    _check(None if worst is None else worst <= ready["target"]),
                ]
            )
    return h.table(["target (DESIGN.md)", "bar", "this run", ""], rows)


def _priority_targets(load: dict[str, Any]) -> list[list[str]]:
    """The work-conserving priorities' targets, from the overload part's priorities run."""
    return [
        [f"priorities: {name}", bar, value, _check(ok)]
        for name, bar, value, ok in overload.priority_verdicts(load)
    ]


EXPLAIN = {
    "overhead": """\
What it measures: the per-request time of a hello-world route called in-process over
ASGI (no sockets, no HTTP parsing), so the ratio is what the middleware itself adds.
*admitted*: a slot is free and the app runs. *cache hit*: a route with
`@policy(cache_ttl=...)` answered from `MemoryCache` without calling the app. *shed*:
one slot, held for good, `max_queue=0`, so every request gets 503 `overloaded` at once.
*breaker open*: `guard.breaker.force_open(...)`, every request gets 503 `unavailable`.
*BaseHTTPMiddleware + Semaphore*: the usual hand-written limiter (`asyncio.wait_for`
on a semaphore, 64 permits, never full here); *BaseHTTPMiddleware alone* shows how
much of that is the base class. Ratios are to bare Starlette's median in the same run;
the last column shows the spread of the rounds.""",
    "overload": """\
What it measures: each server has the same SQLAlchemy pool (`pool_size=5`,
`max_overflow=0`; without guardrails its default 30 s `pool_timeout` is what queues
requests) and the same route (`SELECT pg_sleep(0.05)`), so the pool can serve at most
100 requests/s. guardrails runs with the library's defaults and `concurrency=5`.
*goodput* counts 2xx answered within 1 s of their scheduled send, per second (over the
arrival window, or until the last of them was answered if later), and its share of
what the pool can serve, `5 / pool hold`. *2xx p99 after 3 s*: requests due 3 s or
more into the run, the steady state. *other / no answer*: anything but 200 or 503,
including requests the client gave up on after 8 s. *burst*: once the server is idle
again, a second at half capacity, then one at 1.5x capacity; *burst 503* counts 503s
among the burst's requests. *pool hold*: mean time a connection was checked out per
request (checkout to checkin events). *server loop lag*: how late a 10 ms sleep in the
server woke up; a stall of the shared machine shows there. The priorities table sends logins
(`Policy(priority="critical")`) alone, then beside normal traffic at 3x capacity and
reports (`priority="low"`) at 1x, all on the same five slots.""",
    "outage": """\
What it measures: the guarded server's route has `Policy(stale_ttl=600)`, so while the
database is down it answers with the last good response (`X-Guardrails: stale`). The
*fallback* latencies are those of requests sent while the breaker was open. *Pool
acquires while open*: SQLAlchemy pool `checkout` and `connect` events fired while the
breaker was open, and *attempts*: requests that reached the handler (and so asked the
pool for a connection) while it was open. *Recovery* is from `pg_ctl start` returning
(the server accepts connections) to the breaker closing, which the probe does without
spending a user request.""",
    "looplag": """\
What it measures: a task in the server sleeps 10 ms in a loop and records how much
later than that it wakes; every request's callbacks wait as long. Idle first, then while
the server sheds open-loop load at 10x its capacity. The client shares the machine's
two cores with the server and the database, so its own lag is shown too.""",
    "adaptive": """\
What it measures: two servers with a pool of 20 and `concurrency=20`, the second with
`adaptive=gr.AdaptiveLimit()` (defaults), on a CPU-bound query calibrated to 20 ms
alone. Capacity is measured closed loop, through the app and straight to the database;
the load is open loop at multiples of the first. *2x, from 5 s in*: requests due 5 s
or more into the 2x phase. Windows are the adaptive limit's (0.5 s and 10 samples at
least). The outside slowdown redefines the query's SQL function to `pg_sleep` 30 ms
first, from the benchmark's own connection. See [Adaptive limit](adaptive.md).""",
}

NOTES = """\
## Reading the targets

- **Hot path: missed.** What the admitted path does per request grew with the
  protections against hostile clients (a slow-client watch around every `send`, the
  slot given back before the last chunk, the body read up front for routes with
  `max_body`, read-only and CORS decisions). Counted in instructions under callgrind
  (`benchmarks/hotpath_count.py`, deterministic, `PYTHONHASHSEED=0`), the guarded path
  costs 1.28x the bare one (before those protections: 1.20x); the slow-client watch is
  about 6,000 of the 28,000 instructions guardrails adds. In time, on this machine, the
  ratio is larger than the instruction count says (1.60x in this run; 1.57x in a
  later one, against 1.33x for the code before the protections, measured the same
  hour with its own harness): where the extra time goes beyond instructions is not yet measured.
  `BaseHTTPMiddleware` costs about 15x on its own, before any semaphore.
- **Overload goodput.** The pool itself bounds goodput at `5 / pool hold` (the last
  column of the overload table): a connection is held for the 50 ms query plus its
  round trip, about 52 ms here, so goodput is stated as a share of that bound, with
  `concurrency` equal to the pool size. Every slot serves: no slot is kept idle for
  `critical` work that may never come (`reserve_critical` is an opt-in, and with five
  slots one reserved slot costs about a fifth of the goodput). The semaphores and
  the unprotected server lose goodput because many answers come later than 1 s;
  uvicorn's `--limit-concurrency` loses it at every moment no request happens to be
  waiting at the pool.
- **Overload latency and bursts.** guardrails sheds at once a request whose expected
  wait (waiters ahead x hold / slots, with the hold learnt from hand-offs) is longer
  than its queue timeout, and once its queue has not drained for `delay_interval`
  (1.5 s) it admits only waits up to a quarter of a hold (controlled delay): the
  first seconds of a sustained overload can wait up to the queue timeout, the
  steady state waits a fraction of a hold. A 1 s burst drains within the interval
  and is absorbed whole; a limit with no queue (uvicorn) or a short wait (the 250 ms
  semaphore) sheds part of it.
- **Overload shed p99 and steady 2xx p99.** A shed costs microseconds in process (the
  shed row of the overhead table). Over HTTP, the tail of both comes from stalls of the
  server process, and the largest it causes itself is garbage collection (measured in
  CPU time, which the shared machine cannot inflate): each waiting request's
  connection objects live long enough to reach the oldest generation, so CPython runs
  a full collection once or twice a run, and it walks the whole heap the app built at
  startup (about 90,000 objects, 45 to 100 ms of CPU here). Every request in flight
  waits it out, and the sheds arriving meanwhile with them: a saw-tooth on the chart
  (a stall of the shared machine looks the same).
  The load generator's own collections stay in the young generations (at most 3 ms of
  CPU). `benchmarks/stalls.py` records collections and loop lag with timestamps in
  both processes and lines them up with the slow requests. `gc.freeze()` after
  startup takes the startup heap out of every collection
  ([operations](operations.md#latency-under-overload-garbage-collection-pauses));
  `benchmarks/overload.py --gc-freeze` measures it, the table above is without it.
- **Fallback p99.** A stale answer costs a few microseconds in process (the cache-hit
  row of the overhead table); over HTTP its p99 is that of uvicorn on this machine,
  which the client check against a route without a database shows.
- **Pool acquires while open.** Checkouts, connects and attempts while open are all
  0: a request that was waiting in the limiter's queue when the breaker opened is
  refused when it is granted its slot, before it can reach the handler.
"""

TITLES = {
    "overhead": "Hot-path overhead",
    "overload": "Overload: 4x capacity on a real pool",
    "outage": "Outage: the database stops under load",
    "looplag": "Event-loop lag while shedding at 10x capacity",
    "adaptive": "Adaptive limit: CPU-bound queries, fixed against adaptive",
}


def render(results: dict[str, Any], info: dict[str, str], postgres: str, command: str) -> str:
    """The whole of docs/benchmarks.md."""
    parts = [INTRO, "## The machine", "", _machine(info, postgres), ""]
    parts += [f"Command: `{command}`.", "", "## Targets", "", targets(results), "", NOTES]
    for name, module in PARTS.items():
        if name in results:
            parts += [
                f"## {TITLES[name]}",
                "",
                module.markdown(results[name]),
                "",
                EXPLAIN[name],
                "",
            ]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=h.ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--parts", nargs="*", choices=list(PARTS), default=list(PARTS), help="parts to run"
    )
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="do not measure: render the page from the last run's benchmarks/results/*.json",
    )
    args = parser.parse_args(argv)
    overhead.quiet()
    results: dict[str, Any] = {}
    if args.from_results:
        for name in args.parts:
            results[name] = json.loads((h.RESULTS / f"{name}.json").read_text())
    for name in [] if args.from_results else args.parts:
        module = PARTS[name]
        sub = argparse.ArgumentParser()
        module.add_arguments(sub)
        started = time.monotonic()
        print(f"{name}...", file=sys.stderr)
        results[name] = module.run(sub.parse_args([]))
        print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    postgres = results.get("overload", {}).get("postgres", "PostgreSQL")
    command = "make bench  # .venv/bin/python benchmarks/run.py"
    text = render(results, h.machine(), postgres, command)
    args.output.write_text(text)
    print(text)
    ratio = results.get("overhead", {}).get("cases", {}).get("admitted", {}).get("ratio", math.nan)
    print(f"wrote {args.output}; admitted path {ratio:.3f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
