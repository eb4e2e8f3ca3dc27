"""The once-a-second sampler: the counters over time, early warnings and triage.

The guard's background work calls :meth:`Sampler.sample` every second; the samples of
the last ten minutes feed :func:`~guardrails.observe.triage.diagnose` and the early
warnings, and transitions of either are reported as telemetry events.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from guardrails.breaker import Breaker, describe_outage
from guardrails.limiter import ConcurrencyLimiter
from guardrails.observe.sample import BulkheadSample
from guardrails.observe.telemetry import Telemetry
from guardrails.observe.triage import NONE as NO_TROUBLE
from guardrails.observe.triage import (
    Diagnosis,
    EarlyWarning,
    Sample,
    Warning_,
    diagnose,
    early_warnings,
)
from guardrails.retry import RetryBudget

__all__ = ["SAMPLE_INTERVAL", "Sampler"]

SAMPLE_INTERVAL = 1.0
"""Seconds between two samples."""
_SAMPLES_KEPT = 600


class Sampler:
    """Keeps the last ten minutes of samples and what they say (warnings, diagnosis)."""

    def __init__(
        self,
        limiter: ConcurrencyLimiter,
        telemetry: Telemetry,
        retry_budget: RetryBudget,
        pools: Callable[[], Sequence[dict[str, Any]]],
        settings: EarlyWarning,
        breaker: Breaker | None = None,
    ) -> None:
        self.limiter = limiter
        self.breaker = breaker
        self.telemetry = telemetry
        self.retry_budget = retry_budget
        self.pools = pools
        """Returns the watched pools' snapshots."""
        self.settings = settings
        self.samples: deque[Sample] = deque(maxlen=_SAMPLES_KEPT)
        """Once-a-second samples of the counters (the last ten minutes)."""
        self.diagnosis: Diagnosis = NO_TROUBLE
        self._warned: frozenset[str] = frozenset()

    def sample(self) -> Sample:
        """Record the counters now and update the warnings and the triage."""
        limiter = self.limiter
        limiter.tick()  # an adaptive limit's window may be due without a new request
        adaptive = limiter.adaptive
        pools = self.pools()
        telemetry = self.telemetry
        breaker = self.breaker
        opened_by = None if breaker is None else breaker.opened_by
        bulkheads = limiter.snapshot()["bulkheads"] if telemetry.bulkhead_routes else {}
        sample = Sample(
            at=time.monotonic(),
            arrivals_total=limiter.admitted_total + limiter.shed_total,
            admitted_total=limiter.admitted_total,
            in_flight=limiter.in_flight,
            limit=limiter.limit,
            queued=limiter.queued,
            checked_out=sum(int(p.get("checked_out") or 0) for p in pools) if pools else None,
            pool_size=sum(int(p.get("size") or 0) for p in pools) if pools else None,
            pool_timeouts_total=sum(int(p.get("timeouts_total") or 0) for p in pools),
            connects_total=sum(int(p.get("connects_total") or 0) for p in pools),
            leak_suspects_total=sum(int(p.get("leak_suspects_total") or 0) for p in pools),
            refused_total=telemetry.refused_total,
            retry_remaining=self.retry_budget.remaining(),
            breaker="closed" if breaker is None else breaker.state.value,
            outage_refused_total=telemetry.outage_refused_total,
            opened_by=None if opened_by is None else describe_outage(opened_by),
            bulkheads=tuple(
                BulkheadSample(
                    name, gate["limit"], gate["in_flight"], telemetry.shed_by_bulkhead.get(name, 0)
                )
                for name, gate in bulkheads.items()
            ),
            ceiling=None if adaptive is None else adaptive.ceiling,
            baseline=None if adaptive is None else adaptive.baseline,
            hold=None if adaptive is None or adaptive.last is None else adaptive.last.short,
        )
        self.samples.append(sample)
        self._report_warnings()
        self._report_diagnosis()
        return sample

    def warnings(self) -> list[Warning_]:
        """The early warnings that hold now (see :class:`~guardrails.EarlyWarning`)."""
        window = self.settings.window
        waits = self.telemetry.queue_wait.recent(within=window, now=time.monotonic())
        acquire = [
            p["acquire_wait_p95_seconds"]
            for p in self.pools()
            if p.get("acquire_wait_p95_seconds") is not None
        ]
        return early_warnings(
            list(self.samples),
            self.settings,
            queue_timeout=self.limiter.queue_timeout,
            recent_queue_waits=waits,
            acquire_p95=max(acquire) if acquire else None,
        )

    def _report_warnings(self) -> None:
        warnings = sorted(self.warnings(), key=lambda warning: warning.check)
        warned = frozenset(warning.check for warning in warnings)
        if warned == self._warned:
            return
        # Each warning in words, with what was measured and its threshold.
        said = [f"{w.check}: {w.text}" for w in warnings]
        cleared = sorted(self._warned - warned)
        if cleared:
            said.append(f"cleared: {', '.join(cleared)}")
        self.telemetry.event(
            "early_warning",
            transition=True,
            checks=sorted(warned),
            was=sorted(self._warned),
            warnings=[warning.to_dict() for warning in warnings],
            level=logging.WARNING if warned - self._warned else logging.INFO,
            message="early warning: " + "; ".join(said) + ("" if warnings else " (all clear)"),
        )
        self._warned = warned

    def _report_diagnosis(self) -> None:
        diagnosis = diagnose(self.samples, self.settings.triage_window)
        if diagnosis.kind != self.diagnosis.kind:
            self.telemetry.event(
                "triage",
                transition=True,
                kind=diagnosis.kind,
                was=self.diagnosis.kind,
                numbers=diagnosis.numbers,
                level=logging.INFO if diagnosis.kind == "none" else logging.WARNING,
                message=f"pool triage: {diagnosis.kind}: {diagnosis.evidence}",
            )
        self.diagnosis = diagnosis
