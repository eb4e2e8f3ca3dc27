"""What the adaptive-limit benchmark (``adaptive.py``) reports: counts, table, chart.

The helpers that read the windows (when the limit settled, recovered) are pure and
tested in tests/test_bench_adaptive.py; the markdown goes to docs/benchmarks.md through
``run.py``, the chart to docs/adaptive.png.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _harness as h

SLOTS = 20
"""The connection budget: pool size and ``concurrency`` of both servers."""
SLOW_SLEEP = 0.030
"""What the outside slowdown adds to every query (``pg_sleep``, not CPU)."""
RECOVERED = 0.9
"""The limit counts as recovered at this share of the ceiling (18 of 20)."""
VARIANTS = {"fixed": "fixed, concurrency 20", "adaptive": "AdaptiveLimit(), ceiling 20"}
STEADY_AFTER = 5.0
"""Requests due this many seconds into the 2x phase count as its steady state."""


# -- what the windows say (pure helpers, tested in tests/test_bench_adaptive.py) --------


def reached(limits: Sequence[int]) -> int | None:
    """Windows until the limit first comes near where it ends up (see :func:`settled_after`)."""
    if not limits:
        return None
    final, band = _final(limits)
    return next(i + 1 for i, limit in enumerate(limits) if abs(limit - final) <= band)


def _final(limits: Sequence[int]) -> tuple[float, float]:
    final = statistics.median(limits[len(limits) // 2 :])
    return final, max(2.0, 0.2 * final)


def settled_after(limits: Sequence[int]) -> int | None:
    """Windows until the limit stays near where it ends up; None if it never does.

    Where it ends up is the median of the second half of ``limits``; near is within
    ``max(2, 20 %)`` of that. The answer is the window (1-based) from which on every
    window left the limit near it.
    """
    if not limits:
        return None
    final, band = _final(limits)
    count = len(limits)
    for i in range(count - 1, -1, -1):
        if abs(limits[i] - final) > band:
            return i + 2 if i + 1 < count else None
    return 1


def windows_until(limits: Sequence[int], at_least: float) -> int | None:
    """The window (1-based) that first left the limit at ``at_least`` or more; None: none did."""
    for i, limit in enumerate(limits):
        if limit >= at_least:
            return i + 1
    return None


def in_span(windows: Sequence[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """The windows that ended in ``[start, end)`` (times on ``time.monotonic()``)."""
    return [w for w in windows if start <= w["ended"] < end]


def load_figures(outcomes: Sequence[h.Outcome], duration: float) -> dict[str, Any]:
    """Goodput (2xx per second of arrivals), 2xx latency, sheds, for one phase."""
    ok = [o.latency for o in outcomes if o.status is not None and 200 <= o.status < 300]
    return {
        "sent": len(outcomes),
        "ok": len(ok),
        "shed": sum(1 for o in outcomes if o.status == 503),
        "other": sum(1 for o in outcomes if o.status not in (200, 503)),
        "goodput": len(ok) / duration,
        "ok_p50": h.percentile(ok, 0.5),
        "ok_p99": h.percentile(ok, 0.99),
        "ok_max": max(ok, default=math.nan),
    }


# -- report -----------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return "-" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"


def _windows(count: int | None, seconds: float | None = None) -> str:
    if count is None:
        return "not within the phase"
    return f"{count} ({seconds:.1f} s)" if seconds is not None else str(count)


def verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """The adaptive limit's targets against this run: (name, bar, value, met)."""
    fixed, adapt = results["runs"]["fixed"]["overload"], results["runs"]["adaptive"]
    over, steady = adapt["overload"], adapt["steady"]
    fixed_steady = results["runs"]["fixed"]["steady"]
    ceiling = results["slots"]
    settled, recovered = adapt["settled_after"], adapt["recovered_after"]
    back = adapt["slow_back_after"]
    return [
        (
            "goodput at 2x",
            ">= fixed",
            f"{over['goodput']:.1f}/s vs {fixed['goodput']:.1f}/s",
            over["goodput"] >= fixed["goodput"],
        ),
        (
            "2xx p99 at 2x",
            "<= fixed / 3",
            f"{h.ms(over['ok_p99'])} vs {h.ms(fixed['ok_p99'])} ms "
            f"({_ratio(fixed['ok_p99'], over['ok_p99'])} lower)",
            over["ok_p99"] * 3 <= fixed["ok_p99"],
        ),
        (
            f"2xx p99 at 2x, from {STEADY_AFTER:g} s in",
            "<= fixed / 3",
            f"{h.ms(steady['ok_p99'])} vs {h.ms(fixed_steady['ok_p99'])} ms "
            f"({_ratio(fixed_steady['ok_p99'], steady['ok_p99'])} lower)",
            steady["ok_p99"] * 3 <= fixed_steady["ok_p99"],
        ),
        (
            "limit settles",
            "within ~10 windows",
            f"stays from window {_windows(settled)}, first near at "
            f"{_windows(adapt['reached_after'])} (~{adapt['limit_overload']:g})",
            settled is not None and settled <= 10,
        ),
        (
            "recovery at 0.5x",
            f">= {RECOVERED * ceiling:g} within 30 windows",
            _windows(recovered),
            recovered is not None and recovered <= 30,
        ),
        (
            "outside slowdown",
            "limit goes down, comes back",
            f"low {adapt['slow_low']}, back after {_windows(back)}",
            adapt["slow_low"] < ceiling and back is not None,
        ),
    ]


def adaptive_label(results: dict[str, Any]) -> str:
    """``AdaptiveLimit()``, or the settings of an experiment."""
    settings = results.get("settings") or {}
    return f"AdaptiveLimit({', '.join(f'{k}={v}' for k, v in settings.items())})"


def markdown(results: dict[str, Any]) -> str:
    """The adaptive-limit section of docs/benchmarks.md (and docs/adaptive.md)."""
    cap = results["capacity"]
    runs = results["runs"]
    fixed, adapt = runs["fixed"], runs["adaptive"]
    phases = results["phases"]
    rows = []
    for phase, label in (
        ("overload", "2x capacity"),
        ("steady", f"2x, from {STEADY_AFTER:g} s in"),
        ("slowdown", "outside slowdown, 0.5x"),
        ("calm", "calm, 0.5x"),
    ):
        f, a = fixed[phase], adapt[phase]
        for key, name, show in (
            ("goodput", "2xx/s", lambda v: f"{v:.1f}"),
            ("ok_p50", "2xx p50 ms", h.ms),
            ("ok_p99", "2xx p99 ms", h.ms),
            ("shed", "503", str),
        ):
            rows.append([f"{label}: {name}", show(f[key]), show(a[key]), _ratio(a[key], f[key])])
    rows += [
        ["2x: limit (median of its second half)", SLOTS, f"{adapt['limit_overload']:g}", ""],
        ["2x: windows until the limit is first near it", "-", _windows(adapt["reached_after"]), ""],
        ["2x: windows until it stays near it", "-", _windows(adapt["settled_after"]), ""],
        ["back to 0.5x: windows until limit >= 18", "-", _windows(adapt["recovered_after"]), ""],
        ["outside slowdown: lowest limit", SLOTS, str(adapt["slow_low"]), ""],
        [
            "after it: windows until limit >= 18",
            "-",
            _windows(adapt["slow_back_after"], adapt["slow_back_seconds"]),
            "",
        ],
    ]

    def by_level(capacity: dict[str, Any]) -> str:
        return ", ".join(f"{c}: {v['qps']:.0f}/s" for c, v in capacity["levels"].items())

    baseline = adapt["baseline"]
    short = adapt["short_overload"]
    parts = [
        f"`select count(*) from generate_series(1, {results['n']})`: "
        f"{results['query_alone'] * 1000:.1f} ms of CPU. Capacity {cap['qps']:.0f} queries/s at "
        f"concurrency {cap['best_concurrency']}, closed loop through the app (by "
        f"concurrency: {by_level(cap)}; straight to the database: "
        f"{by_level(results['database'])}). "
        f"Phases: {phases['calm']:g} s at 0.5x, {phases['overload']:g} s at 2x, "
        f"{phases['recovery']:g} s at 0.5x, then {phases['slowdown']:g} s at 0.5x with "
        f"`pg_sleep({SLOW_SLEEP})` added to every query from outside, and {phases['after']:g} s "
        f"after it. Pool 20, `concurrency=20`; {results['postgres']}.",
        "",
        h.table(["", "fixed 20", adaptive_label(results), "adaptive / fixed"], rows),
        "",
        h.table(
            ["adaptive target", "bar", "this run", ""],
            [
                [name, bar, value, "met" if ok else "**missed**"]
                for name, bar, value, ok in verdicts(results)
            ],
        ),
        "",
        f"Adaptive baseline at the end: {h.ms(baseline or math.nan)} ms; median slot hold "
        f"in the 2x windows: {h.ms(short or math.nan)} ms.",
        "",
        f"![latency and limit over time, fixed and adaptive]({Path(results['chart']).name})",
    ]
    return "\n".join(parts)


# -- chart ------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> Path:
    """Latency (top) and limit (bottom) over time, fixed and adaptive side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    runs = results["runs"]
    phases = results["phases"]
    fig, axes = plt.subplots(
        2,
        len(runs),
        figsize=(10, 5.4),
        sharex=True,
        sharey="row",
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 2]},
    )
    over = (phases["calm"], phases["calm"] + phases["overload"])
    for column, (variant, r) in enumerate(runs.items()):
        top, bottom = axes[0][column], axes[1][column]
        for ax in (top, bottom):
            ax.axvspan(*over, color="#d62728", alpha=0.07, linewidth=0)
            ax.axvspan(*r["slowed"], color="#1f77b4", alpha=0.08, linewidth=0)
            ax.grid(True, alpha=0.3)
        points = r["points"]
        for label, color, chosen in (
            ("2xx", "#2ca02c", [p for p in points if p[1] == 200]),
            ("503", "#ff7f0e", [p for p in points if p[1] == 503]),
            ("other", "#000000", [p for p in points if p[1] not in (200, 503)]),
        ):
            if chosen:
                top.scatter(
                    [p[0] for p in chosen],
                    [max(p[2], 0.001) for p in chosen],
                    s=3,
                    color=color,
                    linewidths=0,
                    alpha=0.5,
                    rasterized=True,
                    label=f"{label} ({len(chosen):,})",
                )
        top.set_yscale("log")
        title = VARIANTS[variant]
        if variant == "adaptive":
            title = f"{adaptive_label(results)}, ceiling 20"
        top.set_title(title, fontsize=10)
        top.legend(loc="upper right", fontsize=7, markerscale=3, framealpha=0.85)
        trace = r["trace"]
        bottom.step([t[0] for t in trace], [t[1] for t in trace], where="post", color="#333333")
        bottom.plot(
            [t[0] for t in trace], [t[2] for t in trace], color="#1f77b4", linewidth=0.6, alpha=0.6
        )
        bottom.set_ylim(0, results["slots"] + 2)
        bottom.set_xlabel("seconds (red: 2x capacity; blue: slowed from outside)", fontsize=8)
    axes[0][0].set_ylabel("latency from scheduled send (s, log)", fontsize=8)
    axes[1][0].set_ylabel("limit (black), in flight (blue)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path
