"""Where a process stalls: garbage-collection pauses and event-loop lag, with timestamps.

Both records use ``time.monotonic()``, which is system-wide, so the benchmark process can
line up the server's stalls, its own, and the requests that were slow.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from typing import Any


class StallLog:
    """GC pauses ``(start, seconds, generation, collected)``, loop lags ``(at, seconds)``."""

    def __init__(self) -> None:
        self.gc: list[tuple[float, float, int, int]] = []
        self.lag: list[tuple[float, float]] = []
        self.requests: list[tuple[int, float, float]] = []
        """Server side: ``(id, entered the app, sent the last body chunk)``."""
        self.promoted: Counter[str] = Counter()
        """Types of the objects in generation 1 when it is collected: what reaches gen 2."""
        self._started = 0.0
        self._cpu = 0.0
        self.gc_cpu: list[float] = []
        """CPU seconds of each GC pause (same order as ``gc``): what contention cannot inflate."""

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            if info["generation"] == 1:
                self.promoted.update(_name(type(o)) for o in gc.get_objects(1))
            self._started = time.monotonic()
            self._cpu = time.thread_time()
        else:
            now = time.monotonic()
            self.gc_cpu.append(time.thread_time() - self._cpu)
            self.gc.append(
                (self._started, now - self._started, info["generation"], info["collected"])
            )

    def install(self) -> StallLog:
        """Start recording GC pauses in this process."""
        gc.callbacks.append(self._on_gc)
        return self

    def uninstall(self) -> None:
        """Stop recording GC pauses."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    async def watch_lag(self, interval: float = 0.005) -> None:
        """Record, forever, when a short sleep of this loop woke up late and by how much."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            now = loop.time()
            self.lag.append((before, now - before - interval))

    def to_dict(self, since: float = 0.0) -> dict[str, Any]:
        return {
            "gc": [(*g, c) for g, c in zip(self.gc, self.gc_cpu, strict=True) if g[0] >= since],
            "lag": [lag for lag in self.lag if lag[0] >= since and lag[1] > 0.005],
            "requests": self.requests,
            "promoted": self.promoted.most_common(40),
            "heap": len(gc.get_objects()),
            "frozen": gc.get_freeze_count(),
            "gc_stats": gc.get_stats(),
        }

    def clear(self) -> None:
        self.gc.clear()
        self.gc_cpu.clear()
        self.lag.clear()
        self.requests.clear()
        self.promoted.clear()


def _name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"
