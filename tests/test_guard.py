"""guard.read / guard.write without a database: wrapping, read-only mode, bad input."""

from __future__ import annotations

import inspect

import pytest

import guardrails as gr

pytestmark = pytest.mark.anyio


async def test_write_in_read_only_mode_is_refused_without_calling() -> None:
    guard = gr.Guardrails(concurrency=2)
    calls: list[int] = []

    @guard.write
    async def save(item: int) -> int:
        calls.append(item)
        return item

    assert await save(1) == 1
    guard.set_read_only(True, reason="primary failover")
    with pytest.raises(gr.ReadOnly, match="primary failover") as refused:
        await save(2)
    assert refused.value.retry_after >= 1
    guard.set_read_only(False)
    assert await save(3) == 3
    assert calls == [1, 3]


async def test_reads_go_on_in_read_only_mode() -> None:
    guard = gr.Guardrails(concurrency=2)
    guard.set_read_only(True)

    async def load(key: str, *, default: int = 0) -> int:
        return default

    assert await guard.read(load)("k", default=7) == 7


def test_wrappers_keep_the_signature_and_name() -> None:
    guard = gr.Guardrails(concurrency=2)

    async def load_stats(conn: object, *, limit: int = 10) -> list[int]:
        """Load the stats."""
        return []

    wrapped = guard.read(load_stats)
    assert wrapped.__name__ == "load_stats"
    assert wrapped.__doc__ == "Load the stats."
    assert inspect.signature(wrapped) == inspect.signature(load_stats)


def test_wrapping_something_that_is_not_callable_says_how_to_use_it() -> None:
    guard = gr.Guardrails(concurrency=2)
    with pytest.raises(TypeError, match=r"@guard\.read above `async def"):
        guard.read("SELECT 1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"breaker": {"fail_max": 5}}, "breaker must be a guardrails BreakerSettings"),
        ({"retry": 3}, "retry must be a guardrails RetrySettings"),
        ({"leak_threshold": 0}, "leak_threshold must be a positive number of seconds or None"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        gr.Guardrails(concurrency=2, **kwargs)  # type: ignore[arg-type]


def test_snapshot_has_the_keys_tools_rely_on() -> None:
    guard = gr.Guardrails(concurrency=3)
    snapshot = guard.snapshot()
    assert snapshot["status"] == "pass"
    assert {"limit", "in_flight", "queued", "shed_total"} <= snapshot["limiter"].keys()
    assert snapshot["breaker"]["state"] == "closed"
    assert (snapshot["breaker"]["failures"], snapshot["breaker"]["retry_after"]) == (0, 0)
    assert snapshot["read_only"] == {"enabled": False, "reason": None, "automatic": False}
    assert snapshot["pools"] == []
