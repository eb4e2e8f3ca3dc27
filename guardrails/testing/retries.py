"""Retries that do not sleep: fast tests of read retries and outbound retries.

``guard.read`` and ``GuardedTransport`` wait between attempts through
:func:`guardrails.retry.backoff`; :func:`instant_retries` makes that wait return at
once (and records how long it would have been) until it is restored. Attempts, the
retry budget and what gets retried stay exactly as configured.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import anyio.lowlevel

from guardrails.retry import Sleep, set_backoff

__all__ = ["InstantRetries", "instant_retries"]


class InstantRetries:
    """Retries do not sleep until :meth:`restore` (or the end of the ``with`` block).

    ``waits`` lists the backoff each retry would have slept, in order.
    """

    def __init__(self) -> None:
        self.waits: list[float] = []
        """Seconds each retry would have waited, in order."""
        self._previous: Sleep | None = set_backoff(self._wait)
        self._restored = False

    async def _wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        await anyio.lowlevel.checkpoint()  # still a point where the call can be cancelled

    def restore(self) -> None:
        """Let retries sleep again as before (once; later calls do nothing)."""
        if self._restored:
            return
        self._restored = True
        set_backoff(self._previous)

    def __enter__(self) -> InstantRetries:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    async def __aenter__(self) -> InstantRetries:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.restore()


def instant_retries() -> InstantRetries:
    """Make retries and their backoff instant now; returns the handle that restores.

    Like stamina's ``set_testing``: in effect from the call, undone by
    ``restore()`` or by leaving ``with instant_retries() as retries: ...``.
    """
    return InstantRetries()
