"""The overload benchmark's chart: latency over time, sustained 4x and a burst, per server.

Drawn from the per-request timelines ``overload.py`` keeps in its results (the same run
as the tables), with matplotlib's non-GUI Agg backend, in the demo chart's style.

    .venv/bin/python benchmarks/overload_chart.py [--output docs/overload.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _harness as h

CHARTED = {
    "uvicorn": "uvicorn --limit-concurrency 6",
    "semaphore-250ms": "semaphore, 250 ms wait",
    "guardrails": "guardrails, defaults",
}
"""The servers drawn, top to bottom, and their short labels."""
OUTPUT = h.ROOT / "docs" / "overload.png"
COLORS = {"2xx": "#2ca02c", "503": "#ff7f0e", "other": "#d62728", "no answer": "#000000"}
_FLOOR_S = 0.001  # the log axis needs a floor: a 0.3 ms answer is drawn at 1 ms


def timeline(outcomes: Sequence[h.Outcome]) -> list[list[float]]:
    """Outcomes as compact ``[due s, status or 0, latency ms]`` rows for the results JSON."""
    return [[round(o.due, 4), o.status or 0, round(o.latency * 1000, 2)] for o in outcomes]


def _kind(status: int) -> str:
    if 200 <= status < 300:
        return "2xx"
    if status == 503:
        return "503"
    return "no answer" if status == 0 else "other"


def _scatter(ax: Any, rows: Sequence[Sequence[float]], offset: float = 0.0) -> None:
    for kind, color in COLORS.items():
        chosen = [r for r in rows if _kind(int(r[1])) == kind]
        if not chosen:
            continue
        ax.scatter(
            [r[0] + offset for r in chosen],
            [max(r[2] / 1000, _FLOOR_S) for r in chosen],
            s=5,
            color=color,
            marker="x" if kind == "no answer" else "o",
            linewidths=0.8 if kind == "no answer" else 0,
            alpha=0.6,
            label=f"{kind} ({len(chosen):,})",
            rasterized=True,
        )


def plot(results: dict[str, Any], path: Path = OUTPUT) -> Path | None:
    """Draw the charted servers' timelines into the PNG at ``path``; None if there are none."""
    timelines = results.get("timelines", {})
    variants = [v for v in CHARTED if v in timelines]
    if not variants:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    guarded = results["runs"].get("guardrails", {})
    hold = guarded.get("pool_hold_mean", h.QUERY_SECONDS)
    duration = results["duration"]
    fig, axes = plt.subplots(
        len(variants),
        2,
        figsize=(10.5, 2.3 * len(variants) + 0.9),
        sharey=True,
        squeeze=False,
        gridspec_kw={"width_ratios": [duration + 1.5, 3.2]},
    )
    for row, variant in enumerate(variants):
        sustained, burst = axes[row]
        lines = timelines[variant]
        _scatter(sustained, lines["sustained"])
        _scatter(burst, lines["burst"])
        sustained.axvspan(0, 3.0, color="#000000", alpha=0.04, linewidth=0)
        burst.axvspan(1.0, 2.0, color="#000000", alpha=0.07, linewidth=0)
        for ax in (sustained, burst):
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.axhline(2 * hold, color="#2ca02c", linestyle="--", linewidth=0.8)
            ax.axhline(0.010, color="#ff7f0e", linestyle="--", linewidth=0.8)
        sustained.set_xlim(0, duration + 1.5)
        burst.set_xlim(0, 3.2)
        sustained.set_ylabel(CHARTED[variant], fontsize=9)
        sustained.legend(loc="lower right", fontsize=7, markerscale=2, framealpha=0.85)
    axes[0][0].set_title(
        f"sustained {results['rate']:.0f}/s (4x); shaded: first 3 s, then steady state",
        fontsize=9,
    )
    axes[0][1].set_title("calm 50/s, then burst 150/s (shaded)", fontsize=9)
    axes[-1][0].set_xlabel("seconds since the load started")
    axes[-1][1].set_xlabel("seconds since the calm start")
    freeze = "; every server gc.freeze()s after startup" if results.get("gc_freeze") else ""
    fig.suptitle(
        f"Latency from scheduled send (s, log): pool 5, 50 ms query{freeze}.\n"
        f"Dashed: 2 x hold = {2 * hold * 1000:.0f} ms (2xx target), 10 ms (503 target)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def markdown(path: Path | None) -> str:
    """The image line for docs/benchmarks.md, or nothing if no chart was drawn."""
    if path is None:
        return ""
    return (
        f"![Latency over time under sustained overload and a burst]({path.name})\n\n"
        "Each dot is one request, placed at its scheduled send time, at its latency from "
        "that time (log scale). Left: the sustained 4x run; right: the calm second and "
        "the burst, once the server was idle again."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    results = json.loads((h.RESULTS / "overload.json").read_text())
    path = plot(results, args.output)
    if path is None:
        print("no timelines in the last overload run", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
