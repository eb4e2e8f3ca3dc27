"""The coordinator's Redis side: the keys of one shared budget, and the Lua scripts on them.

Each script lives in ``scripts/<name>.lua`` (shipped in the package) and runs atomically
in Redis, so one call reads and writes every key it needs in one round trip. Every key
of one budget carries the same hash tag: in a Redis Cluster they share one slot, as a
script's keys must.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = ["SCRIPTS", "Keys", "Scripts", "source", "text"]

SCRIPTS = ("lease", "open", "close", "trial")
"""The scripts in ``scripts/``, by name."""


@functools.cache
def source(name: str) -> str:
    """The Lua text of the script ``name`` (read once per process)."""
    folder = resources.files("guardrails.coordination").joinpath("scripts")
    return folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis keys of the budget ``name``: leases, breaker state, trial lock, channel."""

    leases: str
    """Sorted set: process -> when its lease expires (Redis ms)."""
    held: str
    """Hash: process -> slots it holds on record."""
    wants: str
    """Hash: process -> slots it needed lately."""
    breaker: str
    """The shared breaker's opening, "<end of open period, Redis ms>:<opener>"."""
    trial: str
    """The half-open trial lock: the process making the trial."""
    channel: str
    """Pub/sub channel of breaker news and requests for slots (sharded on a Cluster)."""
    generation: str
    """Which server keeps the records, since when, and its last call: see ``lease.lua``."""
    asked: str
    """Set while a request for slots was published lately (one per ttl / 3)."""

    @classmethod
    def of(cls, name: str) -> Keys:
        """The keys of the budget ``name`` (one hash tag: one cluster slot)."""
        ns = f"guardrails:{{{name}}}"
        return cls(
            leases=f"{ns}:leases",
            held=f"{ns}:held",
            wants=f"{ns}:wants",
            breaker=f"{ns}:breaker",
            trial=f"{ns}:trial",
            channel=f"{ns}:events",
            generation=f"{ns}:generation",
            asked=f"{ns}:asked",
        )

    @property
    def for_lease(self) -> list[str]:
        """``KEYS`` of the lease script."""
        return [
            self.leases,
            self.held,
            self.wants,
            self.breaker,
            self.generation,
            self.channel,
            self.asked,
        ]

    @property
    def for_news(self) -> list[str]:
        """``KEYS`` of the open and close scripts."""
        return [self.breaker, self.trial, self.channel]

    @property
    def every(self) -> list[str]:
        """Every key of the budget (one hash slot), the channel included."""
        return [
            self.leases,
            self.held,
            self.wants,
            self.breaker,
            self.trial,
            self.channel,
            self.generation,
            self.asked,
        ]


class Scripts:
    """The scripts registered on one client (no I/O); each call is cut off after ``timeout``."""

    __slots__ = ("_scripts", "timeout")

    def __init__(self, client: Any, timeout: float) -> None:
        self.timeout = timeout
        self._scripts = {name: client.register_script(source(name)) for name in SCRIPTS}

    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run the script ``name`` in Redis; ``TimeoutError`` after ``timeout`` seconds."""
        return await asyncio.wait_for(self._scripts[name](keys=keys, args=args), self.timeout)


def text(value: object) -> str:
    """A Redis reply as text: bytes decoded as UTF-8, anything else through ``str``."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
