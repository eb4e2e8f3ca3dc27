"""Telemetry: state changes reach every sink once, logs stay readable through an outage."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool

import guardrails as gr
from guardrails.observe.telemetry import LoggingSink, Telemetry

Events = list[tuple[str, dict[str, Any]]]


def recorder() -> tuple[Events, Any]:
    seen: Events = []

    def sink(event: str, fields: dict[str, Any]) -> None:
        seen.append((event, fields))

    return seen, sink


def test_repeats_are_folded_into_a_count_and_transitions_always_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("guardrails.test.telemetry")
    sink = LoggingSink(min_interval=0.2, log=log)
    caplog.set_level(logging.INFO, logger=log.name)
    for _ in range(5):
        sink("outage_answered", {"key": "/items", "message": "db down"})
    sink("outage_answered", {"key": "/other", "message": "db down elsewhere"})
    for state in ("open", "half_open", "open"):
        sink("breaker_state", {"transition": True, "message": f"breaker {state}"})
    assert [r.getMessage() for r in caplog.records] == [
        "db down",
        "db down elsewhere",
        "breaker open",
        "breaker half_open",
        "breaker open",
    ]
    time.sleep(0.25)
    sink("outage_answered", {"key": "/items", "message": "db down"})
    assert caplog.records[-1].getMessage() == "db down (4 more like it not logged)"
    assert caplog.records[-1].guardrails == {"event": "outage_answered", "key": "/items"}


def test_a_broken_sink_never_breaks_the_caller_nor_the_other_sinks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    telemetry = Telemetry()
    seen, sink = recorder()

    def broken(event: str, fields: dict[str, Any]) -> None:
        raise RuntimeError("sink down")

    telemetry.add_sink(broken)
    telemetry.add_sink(sink)
    telemetry.event("read_only", transition=True, enabled=True, message="read-only mode on")
    assert seen == [
        ("read_only", {"transition": True, "enabled": True, "message": "read-only mode on"})
    ]
    assert any("telemetry sink" in r.getMessage() for r in caplog.records)


def test_leak_suspects_reach_every_sink_once_each(tmp_path: Any) -> None:
    # SQLite through SQLAlchemy's real QueuePool: a connection held past the threshold.
    engine = create_engine(f"sqlite:///{tmp_path / 'leak.db'}", poolclass=QueuePool, pool_size=2)
    guard = gr.Guardrails(concurrency=2, leak_threshold=0.05)
    seen, sink = recorder()
    guard.telemetry.add_sink(sink)
    watcher = guard.watch_pool(engine, name="main")
    try:
        leaked = engine.connect()
        leaked.execute(text("SELECT 1"))
        time.sleep(0.1)
        with engine.connect() as conn:  # the next checkout looks for overdue ones
            conn.execute(text("SELECT 1"))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        leaked.close()
    finally:
        watcher.close()
        engine.dispose()
    leaks = [fields for event, fields in seen if event == "leak_suspect"]
    assert len(leaks) == 1
    assert leaks[0]["pool"] == "main"
    assert leaks[0]["held_seconds"] >= 0.05
    assert "test_telemetry.py" in leaks[0]["where"]
    assert leaks[0]["message"].startswith("leak suspect in pool main")
    assert guard.snapshot()["pools"][0]["leak_suspects_total"] == 1


@pytest.mark.anyio
async def test_early_warnings_are_reported_when_they_start_and_when_they_clear() -> None:
    guard = gr.Guardrails(
        concurrency=2, early_warning=gr.EarlyWarning(utilization=0.8, sustained=0.2, window=0.2)
    )
    seen, sink = recorder()
    guard.telemetry.add_sink(sink)
    permits = [guard.limiter.try_acquire(gr.Priority.CRITICAL) for _ in range(2)]
    for _ in range(6):
        guard.sample()
        await anyio.sleep(0.05)
    for permit in permits:
        assert permit is not None
        permit.release()
    for _ in range(6):
        guard.sample()
        await anyio.sleep(0.05)
    changes = [fields for event, fields in seen if event == "early_warning"]
    assert [(c["was"], c["checks"]) for c in changes] == [
        ([], ["utilization"]),
        (["utilization"], []),
    ]
    assert changes[0]["level"] == logging.WARNING
    assert changes[1]["message"] == "early warning: all clear"
    assert guard.limiter.in_flight == 0


def test_snapshot_status_follows_the_health_fail_conditions() -> None:
    default = gr.Guardrails(concurrency=2)
    lenient = gr.Guardrails(concurrency=2, health_fail_on=())
    strict = gr.Guardrails(concurrency=2, health_fail_on=("read_only",))
    for guard in (default, lenient, strict):
        guard.breaker.force_open(30)
    assert default.snapshot()["status"] == "fail"
    assert lenient.snapshot()["status"] == "warn"
    assert lenient.health.report()["status"] == "warn"
    # Read-only comes with the open breaker (read_only_on_open), so "read_only" fails.
    assert strict.snapshot()["status"] == "fail"


@pytest.mark.anyio
async def test_a_sync_pool_timing_out_on_a_worker_thread_opens_the_breaker_on_the_loop(
    tmp_path: Any,
) -> None:
    # A real QueuePool of one on SQLite: one connection held, a worker thread (no request
    # context, as with run_in_executor) times out waiting for a second.
    engine = create_engine(
        f"sqlite:///{tmp_path / 'sync.db'}",
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.05,
    )
    guard = gr.Guardrails(concurrency=2, breaker=gr.BreakerSettings(fail_max=1))
    changed_on: list[int] = []
    guard.breaker.add_listener(lambda old, new, snapshot: changed_on.append(threading.get_ident()))
    watcher = guard.watch_pool(engine, name="sync")
    held = engine.connect()
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            engine.connect()
        except Exception as exc:
            failures.append(exc)

    try:
        thread = threading.Thread(target=worker)
        thread.start()
        await anyio.to_thread.run_sync(thread.join)
        with anyio.fail_after(5):
            while guard.breaker.state != "open":
                await anyio.sleep(0.01)
    finally:
        held.close()
        watcher.close()
        engine.dispose()
    assert [type(exc).__name__ for exc in failures] == ["TimeoutError"]
    assert changed_on == [threading.get_ident()]  # the loop's thread, not the worker's
    assert guard.snapshot()["pools"][0]["timeouts_total"] == 1
