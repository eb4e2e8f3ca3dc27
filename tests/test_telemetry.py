"""Telemetry: state changes reach every sink once, logs stay readable through an outage."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import guardrails as gr
from guardrails.observe.telemetry import LoggingSink, Telemetry


def client_for(guard: gr.Guardrails, work: Any) -> httpx.AsyncClient:
    """An app with ``work`` at /work and /reports/{name}, behind ``guard``."""
    app = Starlette(
        routes=[Route("/work", work), Route("/reports/{name}", work)],
        middleware=[Middleware(gr.GuardrailsMiddleware, guard=guard)],
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


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
    # The log line says what was measured and the threshold, not only the check's name.
    assert changes[0]["message"] == (
        "early warning: utilization: at least 100% of the slots busy for the last 0.2 s "
        "(warning at 80%)"
    )
    assert changes[0]["warnings"][0]["observed"] == 1.0
    assert changes[0]["warnings"][0]["threshold"] == 0.8
    assert changes[1]["message"] == "early warning: cleared: utilization (all clear)"
    assert guard.limiter.in_flight == 0


@pytest.mark.anyio
async def test_a_queue_wait_warning_logs_the_measured_p95_and_its_threshold(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = gr.Guardrails(
        concurrency=1, queue_timeout=5, early_warning=gr.EarlyWarning(queue_wait_p95=0.1)
    )
    caplog.set_level(logging.INFO, logger="guardrails")
    release = anyio.Event()

    async def work(request: Request) -> Response:
        await release.wait()
        return PlainTextResponse("ok")

    guard.sample()
    async with client_for(guard, work) as c, anyio.create_task_group() as tg:
        for _ in range(2):  # one holds the slot, the other queues behind it
            tg.start_soon(c.get, "/work")
        with anyio.fail_after(5):
            while guard.limiter.queued < 1:
                await anyio.sleep(0.01)
        await anyio.sleep(0.3)
        release.set()
    guard.sample()
    (warning,) = guard.warnings()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("early")]
    assert lines == [
        f"early warning: queue_wait_p95: requests wait {round(warning.observed * 1000)} ms for "
        "a slot at p95 (warning above 100 ms)"
    ]
    assert warning.observed >= 0.3
    assert warning.threshold == 0.1


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


@pytest.mark.anyio
async def test_sheds_by_a_full_bulkhead_are_counted_apart_from_the_global_slots() -> None:
    reports = gr.Policy(max_concurrency=1)
    guard = gr.Guardrails(concurrency=2, queue_timeout=0.05, policies={"/reports/{name}": reports})
    release = anyio.Event()

    async def work(request: Request) -> Response:
        await release.wait()
        return PlainTextResponse("ok")

    async with client_for(guard, work) as c, anyio.create_task_group() as tg:
        tg.start_soon(c.get, "/reports/a")  # holds the bulkhead's one slot
        with anyio.fail_after(5):
            while guard.limiter.in_flight < 1:
                await anyio.sleep(0.01)
        shed_by_bulkhead = [await c.get(f"/reports/{n}") for n in "bcd"]
        tg.start_soon(c.get, "/work")  # now every global slot is busy
        with anyio.fail_after(5):
            while guard.limiter.in_flight < 2:
                await anyio.sleep(0.01)
        shed_globally = await c.get("/work")
        release.set()
    assert [r.status_code for r in shed_by_bulkhead] == [503, 503, 503]
    assert shed_globally.status_code == 503
    assert guard.telemetry.shed_by_bulkhead == {"/reports/{name}": 3}
    assert guard.limiter.shed_total == 4
    assert guard.snapshot()["telemetry"]["shed_by_bulkhead"] == {"/reports/{name}": 3}
    sample = guard.sample()
    assert [(b.name, b.limit, b.shed_total) for b in sample.bulkheads] == [
        ("/reports/{name}", 1, 3)
    ]


@pytest.mark.anyio
async def test_the_breaker_opening_names_the_route_and_pool_of_its_outage(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A real QueuePool of one on SQLite, its connection held: the request's checkout
    # times out in the pool named "sync", on the route /reports/{name}.
    engine = create_engine(
        f"sqlite:///{tmp_path / 'open.db'}",
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.05,
    )
    guard = gr.Guardrails(concurrency=2, breaker=gr.BreakerSettings(fail_max=1))
    seen, sink = recorder()
    guard.telemetry.add_sink(sink)
    watcher = guard.watch_pool(engine, name="sync")
    caplog.set_level(logging.INFO, logger="guardrails.breaker")

    async def work(request: Request) -> Response:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return PlainTextResponse("ok")

    held = engine.connect()
    try:
        async with client_for(guard, work) as c:
            failed = await c.get("/reports/monthly")
            refused = await c.get("/work")
    finally:
        held.close()
        watcher.close()
        engine.dispose()
    assert (failed.status_code, refused.status_code) == (503, 503)
    opened_by = guard.breaker.opened_by
    assert opened_by is not None
    assert {k: opened_by[k] for k in ("error", "route", "pool", "probe")} == {
        "error": "TimeoutError",
        "route": "/reports/{name}",
        "pool": "sync",
        "probe": False,
    }
    assert guard.snapshot()["breaker"]["opened_by"] == opened_by
    (line,) = [r.getMessage() for r in caplog.records if "-> open" in r.getMessage()]
    assert line == (
        "database circuit breaker closed -> open (failures 1, retry after 30s; "
        "opened by TimeoutError on /reports/{name} (pool sync))"
    )
    (event,) = [fields for name, fields in seen if name == "breaker_state"]
    assert event["opened_by"] == opened_by
    assert guard.telemetry.breaker_opened_by == {("/reports/{name}", "sync"): 1}
    assert guard.telemetry.outage_refused_total == 2  # the outage and the refusal after it
    assert guard.breaker.refused_total == 1
