"""Prometheus metrics for a guard (extra ``prometheus``): a collector and a ``/metrics`` route.

::

    from prometheus_client import REGISTRY
    from guardrails.observe.prometheus import GuardrailsCollector, metrics_endpoint

    REGISTRY.register(GuardrailsCollector(guard))
    app.routes.append(Route("/metrics", metrics_endpoint()))

The collector reads the guard's counters when Prometheus scrapes, so the request path
pays nothing for metrics. Names follow Prometheus conventions (``_total`` counters,
``_seconds`` units); the ``route`` label is always a route template, never a raw path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector
from starlette.types import Receive, Scope, Send

from guardrails.policy import POLICY_ATTRIBUTE, Policy

if TYPE_CHECKING:
    from guardrails.guard import Guardrails

__all__ = ["GuardrailsCollector", "metrics_endpoint", "outbound_metrics"]

_STATES = ("closed", "open", "half_open")


class GuardrailsCollector(Collector):
    """Exposes one guard's state and counters; register it with a ``CollectorRegistry``.

    ``service`` adds a constant ``service`` label, for processes running several guards.
    """

    def __init__(self, guard: Guardrails, *, service: str | None = None) -> None:
        self.guard = guard
        self._labels = {"service": service} if service else {}

    def _gauge(self, name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
        names = [*self._labels, *labels]
        family = GaugeMetricFamily(name, doc, labels=names)
        family.add_metric([*self._labels.values(), *labels.values()], value)
        return family

    def collect(self) -> Iterator[Metric]:
        guard = self.guard
        snapshot = guard.snapshot()
        base = list(self._labels)
        base_values = list(self._labels.values())
        limiter = snapshot["limiter"]
        yield self._gauge("guardrails_in_flight", "Requests holding a slot.", limiter["in_flight"])
        yield self._gauge(
            "guardrails_limit", "Slots (concurrent DB-bound requests).", limiter["limit"]
        )
        yield self._gauge(
            "guardrails_limit_ceiling",
            "Configured slots: the most the limit may be.",
            limiter["configured_limit"],
        )
        adaptive = limiter["adaptive"]
        if adaptive is not None:
            if adaptive["baseline_seconds"] is not None:
                yield self._gauge(
                    "guardrails_adaptive_baseline_seconds",
                    "Seconds a slot is held when the database is healthy (adaptive limit).",
                    adaptive["baseline_seconds"],
                )
            yield self._gauge(
                "guardrails_adaptive_gradient",
                "Baseline x tolerance / recent hold time, clamped to [0.5, 1] (adaptive limit).",
                adaptive["gradient"],
            )
        yield self._gauge(
            "guardrails_queue_depth", "Requests waiting for a slot.", limiter["queued"]
        )

        telemetry = guard.telemetry
        wait = telemetry.queue_wait
        # Requests admitted at once waited 0 s: they belong in the lowest bucket. Counting
        # them here keeps the request path free of any histogram work.
        immediate = max(0, limiter["admitted_total"] - telemetry.queued_admitted)
        buckets = [(le, count + immediate) for le, count in wait.cumulative()]
        histogram = HistogramMetricFamily(
            "guardrails_queue_wait_seconds",
            "Time admitted requests waited for a slot.",
            labels=base,
        )
        histogram.add_metric(base_values, buckets, wait.sum)
        yield histogram

        shed = CounterMetricFamily(
            "guardrails_shed",
            "Requests answered 503 by guardrails, by reason and route template.",
            labels=[*base, "reason", "route"],
        )
        for (reason, route), count in sorted(telemetry.shed.items()):
            shed.add_metric([*base_values, reason, route], count)
        yield shed
        bulkheads = CounterMetricFamily(
            "guardrails_bulkhead_shed",
            "Requests shed by a full bulkhead (a policy's max_concurrency) while the "
            "global slots had room, by bulkhead (its first route template).",
            labels=[*base, "bulkhead"],
        )
        for name, count in sorted(telemetry.shed_by_bulkhead.items()):
            bulkheads.add_metric([*base_values, name], count)
        yield bulkheads

        fallbacks = CounterMetricFamily(
            "guardrails_fallbacks",
            "Fallback answers by kind (stale, rejected) and route template.",
            labels=[*base, "kind", "route"],
        )
        for (kind, route), count in sorted(telemetry.fallbacks.items()):
            fallbacks.add_metric([*base_values, kind, route], count)
        yield fallbacks

        breaker = snapshot["breaker"]
        state = GaugeMetricFamily(
            "guardrails_breaker_state",
            "1 for the breaker's current state, 0 for the others.",
            labels=[*base, "state"],
        )
        for name in _STATES:
            state.add_metric([*base_values, name], 1.0 if breaker["state"] == name else 0.0)
        yield state
        transitions = CounterMetricFamily(
            "guardrails_breaker_transitions",
            "Breaker state changes, by the state entered.",
            labels=[*base, "state"],
        )
        for name in _STATES:
            transitions.add_metric([*base_values, name], telemetry.breaker_transitions.get(name, 0))
        yield transitions
        opens = CounterMetricFamily(
            "guardrails_breaker_opened_by",
            "Breaker openings, by the route template and pool of the outage that opened it "
            "(empty when unknown: the recovery probe, a coordinator, work outside requests).",
            labels=[*base, "route", "pool"],
        )
        for (route, pool), count in sorted(telemetry.breaker_opened_by.items()):
            opens.add_metric([*base_values, route, pool], count)
        yield opens
        yield self._gauge(
            "guardrails_breaker_failures", "Consecutive outages counted.", breaker["failures"]
        )

        retry = snapshot["retry"]
        retries = CounterMetricFamily(
            "guardrails_retries",
            "Read retries by outcome: retried, or denied by the retry budget.",
            labels=[*base, "outcome"],
        )
        retries.add_metric([*base_values, "retried"], retry["retries_total"])
        retries.add_metric([*base_values, "denied"], retry["denied_total"])
        yield retries
        yield self._gauge(
            "guardrails_retry_budget_remaining",
            "Retries still allowed in the current window.",
            retry["remaining"],
        )
        yield self._gauge(
            "guardrails_read_only",
            "1 while read-only mode is on.",
            1.0 if snapshot["read_only"]["enabled"] else 0.0,
        )
        yield from self._pools(snapshot["pools"], base, base_values)
        yield from outbound_metrics(snapshot.get("outbound", ()), base, base_values)

    def _pools(
        self, pools: list[dict[str, Any]], base: list[str], base_values: list[str]
    ) -> Iterator[Metric]:
        labels = [*base, "pool"]
        gauges = {
            "checked_out": ("guardrails_pool_checked_out", "Connections checked out."),
            "size": ("guardrails_pool_size", "Connections the pool may hold."),
            "waiting": ("guardrails_pool_waiting", "Callers waiting for a connection."),
        }
        counters = {
            "timeouts_total": ("guardrails_pool_timeouts", "Pool acquire timeouts."),
            "leak_suspects_total": (
                "guardrails_pool_leak_suspects",
                "Connections reported as leak suspects.",
            ),
        }
        for key, (name, doc) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=labels)
            for pool in pools:
                value = pool.get(key)
                if value is not None:
                    family.add_metric([*base_values, str(pool.get("name"))], float(value))
            yield family
        for key, (name, doc) in counters.items():
            counter = CounterMetricFamily(name, doc, labels=labels)
            for pool in pools:
                counter.add_metric([*base_values, str(pool.get("name"))], float(pool.get(key, 0)))
            yield counter
        acquire = HistogramMetricFamily(
            "guardrails_pool_acquire_wait_seconds",
            "Time spent waiting for a pooled connection.",
            labels=labels,
        )
        for pool in pools:
            histogram = pool.get("acquire_wait_histogram")
            if histogram:
                acquire.add_metric(
                    [*base_values, str(pool.get("name"))],
                    [(le, count) for le, count in histogram["buckets"]],
                    histogram["sum"],
                )
        yield acquire


def outbound_metrics(
    transports: Iterable[dict[str, Any]], base: list[str], base_values: list[str]
) -> Iterator[Metric]:
    """Calls, failures, retries, refusals, latency and breaker state per outbound origin.

    Labelled ``client`` (the ``GuardedTransport``'s name) and ``origin``
    (``scheme://host:port``); ``reason`` for refusals, ``state`` for the breaker.
    """
    labels = [*base, "client", "origin"]
    counters = {
        "calls_total": ("guardrails_outbound_calls", "Outbound calls made (retries not counted)."),
        "attempts_total": (
            "guardrails_outbound_attempts",
            "Outbound requests sent to the origin: first tries and retries.",
        ),
        "failures_total": (
            "guardrails_outbound_failures",
            "Outbound attempts that ended in an outage of the origin.",
        ),
        "retries_total": ("guardrails_outbound_retries", "Outbound retries made."),
    }
    families = {
        key: CounterMetricFamily(name, doc, labels=labels) for key, (name, doc) in counters.items()
    }
    refused = CounterMetricFamily(
        "guardrails_outbound_refused",
        "Outbound calls refused or cut short, by reason.",
        labels=[*labels, "reason"],
    )
    latency = HistogramMetricFamily(
        "guardrails_outbound_latency_seconds",
        "Time from an outbound call's start to its response headers or failure, retries included.",
        labels=labels,
    )
    state = GaugeMetricFamily(
        "guardrails_outbound_breaker_state",
        "1 for the origin breaker's current state, 0 for the others.",
        labels=[*labels, "state"],
    )
    in_flight = GaugeMetricFamily(
        "guardrails_outbound_in_flight",
        "Outbound requests sent to the origin and not yet answered in full.",
        labels=labels,
    )
    for transport in transports:
        for origin in transport["origins"]:
            values = [*base_values, transport["name"], origin["origin"]]
            for key, family in families.items():
                family.add_metric(values, origin[key])
            for reason, count in origin["refused"].items():
                refused.add_metric([*values, reason], count)
            histogram = origin["latency"]
            latency.add_metric(values, histogram["buckets"], histogram["sum"])
            for name in _STATES:
                current = origin["breaker"]["state"] == name
                state.add_metric([*values, name], 1.0 if current else 0.0)
            in_flight.add_metric(values, origin["in_flight"])
    yield from families.values()
    yield from (refused, latency, state, in_flight)


class _MetricsEndpoint:
    """ASGI app serving a registry in the Prometheus text format; exempt from the limiter."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.registry)
        headers = [
            (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


setattr(_MetricsEndpoint, POLICY_ATTRIBUTE, Policy(exempt=True))


def metrics_endpoint(registry: CollectorRegistry = REGISTRY) -> _MetricsEndpoint:
    """An ASGI app for ``Route("/metrics", metrics_endpoint())``; bypasses the limiter."""
    return _MetricsEndpoint(registry)
