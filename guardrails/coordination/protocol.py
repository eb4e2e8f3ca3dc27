"""What a guard asks of a coordinator: the seam between one process and its fleet.

:class:`~guardrails.coordination.coordinator.RedisCoordinator` is the one guardrails
ships; ``Guardrails(coordinator=...)`` takes any object with these methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from guardrails.guard import Guardrails

__all__ = ["Coordinator"]


class Coordinator(Protocol):
    """Shares the connection budget and the breaker state among processes.

    ``attach(guard)`` is called once by the guard's constructor; ``start()`` by the
    guard's background work, on the app's event loop (it runs until ``aclose()``). It drives
    ``guard.limiter.set_limit`` with the slots it holds, and ``guard.breaker``'s
    ``force_open`` / ``force_close`` / ``hold`` with the shared state.
    """

    def attach(self, guard: Guardrails) -> None: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...
