"""Early warnings: pool trouble coming, said in numbers before errors start.

Each :class:`Warning_` carries what was measured and the threshold it crossed, and its
text says both; :func:`early_warnings` checks the recent samples against
:class:`EarlyWarning`'s thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guardrails.observe.sample import Sample, last_seconds
from guardrails.observe.stats import rank

__all__ = ["EarlyWarning", "Warning_", "early_warnings", "queue_wait_p95"]


@dataclass(frozen=True, slots=True)
class EarlyWarning:
    """Thresholds of the early warnings (``Guardrails(early_warning=...)``).

    ``queue_wait_p95`` defaults to half the limiter's ``queue_timeout``;
    ``acquire_wait_p95`` to 100 ms; ``utilization`` to 0.8 held for ``sustained``
    seconds (30). Each is checked over the last ``window`` seconds (30); the triage
    looks at the last ``triage_window`` seconds (60).
    """

    queue_wait_p95: float | None = None
    acquire_wait_p95: float = 0.1
    utilization: float = 0.8
    sustained: float = 30.0
    window: float = 30.0
    triage_window: float = 60.0
    """Seconds of samples the triage looks at."""

    def __post_init__(self) -> None:
        for name in ("acquire_wait_p95", "sustained", "window", "triage_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.queue_wait_p95 is not None and not self.queue_wait_p95 > 0:
            raise ValueError(f"queue_wait_p95 must be > 0 seconds, not {self.queue_wait_p95!r}")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"utilization must be above 0 and at most 1, not {self.utilization!r}")


@dataclass(frozen=True, slots=True)
class Warning_:
    """One early warning: what, how much, against which threshold."""

    check: str
    observed: float
    threshold: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "observed": self.observed,
            "threshold": self.threshold,
            "text": self.text,
        }


def queue_wait_p95(window: Sequence[Sample], recent_waits: Sequence[float]) -> float | None:
    """p95 of the queue wait over every request admitted in ``window``.

    Requests admitted at once waited 0 s and are not in ``recent_waits`` (the waits
    of those that queued, in the same window); they are counted here as zeros.
    """
    if len(window) < 2:
        return None
    admitted = window[-1].admitted_total - window[0].admitted_total
    if admitted <= 0:
        return None
    waits = sorted(recent_waits)
    zeros = max(0, admitted - len(waits))
    # Nearest rank over the zeros and the waits together, without a list of the zeros.
    at = rank(zeros + len(waits), 0.95)
    if at <= zeros:
        return 0.0
    return waits[min(len(waits) - 1, at - zeros - 1)]


def early_warnings(
    samples: Sequence[Sample],
    settings: EarlyWarning,
    *,
    queue_timeout: float,
    recent_queue_waits: Sequence[float],
    acquire_p95: float | None,
) -> list[Warning_]:
    """The early warnings that hold now."""
    found: list[Warning_] = []
    recent = last_seconds(samples, settings.window)
    limit_wait = settings.queue_wait_p95 or queue_timeout / 2
    p95 = queue_wait_p95(recent, recent_queue_waits)
    # Observed values are whole milliseconds, the same the text shows.
    if p95 is not None and limit_wait > 0 and p95 > limit_wait:
        ms = round(p95 * 1000)
        found.append(
            Warning_(
                "queue_wait_p95",
                ms / 1000,
                limit_wait,
                f"requests wait {ms} ms for a slot at p95 "
                f"(warning above {limit_wait * 1000:.0f} ms)",
            )
        )
    if acquire_p95 is not None and acquire_p95 > settings.acquire_wait_p95:
        ms = round(acquire_p95 * 1000)
        found.append(
            Warning_(
                "acquire_wait_p95",
                ms / 1000,
                settings.acquire_wait_p95,
                f"pool acquire p95 is {ms} ms "
                f"(warning above {settings.acquire_wait_p95 * 1000:.0f} ms)",
            )
        )
    held = last_seconds(samples, settings.sustained)
    # Only once the samples reach back a whole window can it have been sustained.
    if held and samples[-1].at - samples[0].at >= settings.sustained * 0.9:
        lowest = min(s.in_flight / s.limit for s in held if s.limit)
        if lowest >= settings.utilization:
            found.append(
                Warning_(
                    "utilization",
                    round(lowest, 3),
                    settings.utilization,
                    f"at least {lowest:.0%} of the slots busy for the last "
                    f"{round(settings.sustained, 1):g} s (warning at {settings.utilization:.0%})",
                )
            )
    if samples and samples[-1].retry_remaining == 0:
        found.append(
            Warning_(
                "retry_budget",
                0,
                0,
                "the retry budget is spent: 0 retries left (warning at 0): reads are not "
                "retried until calls outnumber retries again",
            )
        )
    return found
